"""Stage 2: the localization maps of a split (METHOD.md section 2; the maps themselves:
``wsss.maps``), RUN/maps/NAME.npz per image.

Each image's classes get maps of the kinds in ``combine`` with k partners per class drawn
from the split (``MapInputs``); finished images are skipped when RUN/maps/settings.json
records the same settings (``overwrite=True`` recomputes everything).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Subset

from wsss import config as C
from wsss import distributed, provenance
from wsss import rundir as R
from wsss.data.pairs import partners_for_class
from wsss.data.transforms import eval_transforms
from wsss.data.voc import VOCDataset, label_ids
from wsss.files import check_settings, fingerprint, folder_state, write_json
from wsss.maps import (
    KINDS,
    SELF_TRANSFORMS,
    check_self_transforms,
    localization_maps,
    maps_path,
    parse_combine,
    save_maps,
)
from wsss.progress import progress
from wsss.stages.train_classifier import load_classifier

log = logging.getLogger(__name__)


# =========================================================================== stage

@dataclass
class MapsConfig:
    """Settings of the maps stage (METHOD.md section 2).

    ``combine``: which kinds of map are averaged ("cam", "coatt", "self"); ("cam",) gives
    the single-image baseline. ``maps_dir``: output folder, a name inside ``run_dir`` or
    an absolute path (e.g. "maps_cam" to keep a baseline beside the default "maps").
    ``image_size``: the network sees images resized to this square size (None: native);
    maps are always saved at the native size. ``batch``: images per backbone call.
    ``amp``: bf16 autocast on CUDA. ``workers``: DataLoader processes that load each image
    and its partners. ``limit``: only the first ``limit`` images of the split (a quick look).
    ``seed``: partners of image i are drawn with ``np.random.default_rng([seed, i])``.
    ``aggregate``: "mean" (ours) or "reference" (the authors' five-map rule, module
    docstring). ``partners``: "distinct" (k other images, without replacement) or
    "replace" (the reference: k draws with replacement, I_m itself included).
    """

    data_root: str = C.setting(help="dataset root in VOC layout")
    run_dir: str = C.setting(help="run directory holding classifier.pt")
    split: str = C.setting("train", "split whose images get maps (ImageSets/Segmentation/SPLIT.txt)")
    k: int = C.setting(3, "partners per class for the cross-image maps", allowed=">= 1")
    combine: tuple[str, ...] = C.setting(
        KINDS, "kinds of map averaged: cam (single image), coatt (cross-image), self (self-pairs)")
    scales: tuple[float, ...] = C.setting(
        (1.0,), "inference scales (each rescales the image and its partners)", allowed="> 0")
    self_transforms: tuple[str, ...] = C.setting(SELF_TRANSFORMS, "self-pair transforms: identity flip down up")
    aggregate: Literal["mean", "reference"] = C.setting(
        "mean", "mean: normalised maps averaged per kind (ours); reference: the authors' five-map rule")
    partners: Literal["distinct", "replace"] = C.setting(
        "distinct", "distinct: k other images per class; replace: k draws with replacement, the image included "
                    "(reference)")
    image_size: int | None = C.setting(
        None, "resize images to this square size for the network (none: native); maps keep the native size",
        allowed=">= 16")
    seed: int = C.setting(0, "seed of the partner draws (one generator per image)", allowed=">= 0")
    device: str = C.setting("auto", "auto | cpu | cuda[:i]")
    amp: bool = C.setting(True, "bf16 autocast on CUDA")
    batch: int = C.setting(8, "images per backbone call", allowed=">= 1")
    workers: int = C.setting(0, "DataLoader worker processes (image and partner loading)", allowed=">= 0")
    limit: int | None = C.setting(None, "only the first N images of the split", allowed=">= 0")
    maps_dir: str = C.setting(R.MAPS, "output folder inside the run directory (or an absolute path)")
    overwrite: bool = C.setting(False, "recompute maps that already exist")


def _settings(cfg: MapsConfig, checkpoint: Path) -> dict:
    """What the saved maps depend on (split, limit, device and batching do not change them)."""
    return {"combine": list(parse_combine(cfg.combine)), "k": cfg.k, "scales": [float(s) for s in cfg.scales],
            "self_transforms": list(cfg.self_transforms), "image_size": cfg.image_size, "seed": cfg.seed,
            "aggregate": cfg.aggregate, "partners": cfg.partners,
            "classifier": fingerprint(checkpoint.parent, checkpoint.name)}


class MapInputs(Dataset):
    """Item i: the normalised image, its native size, its label ids and, when partners are
    wanted, k partner images per class drawn with ``np.random.default_rng([seed, i])``
    (the same draw with any number of workers)."""

    def __init__(self, base, transform, k: int, seed: int, with_partners: bool, replace: bool = False):
        self.base, self.transform, self.k, self.seed, self.replace = base, transform, k, seed, replace
        self.with_partners = with_partners
        self.labels = np.asarray(base.labels)

    def __len__(self) -> int:
        return len(self.base)

    def _image(self, i: int) -> torch.Tensor:
        return self.transform(self.base[i]["image"]).as_subclass(torch.Tensor)

    def __getitem__(self, i: int) -> dict:
        item = self.base[i]
        classes = label_ids(self.labels[i])
        partners: dict[int, list[torch.Tensor]] = {}
        lonely: list[int] = []
        if self.with_partners:
            rng = np.random.default_rng([self.seed, i])
            loaded: dict[int, torch.Tensor] = {}
            for c in classes:
                ids = partners_for_class(self.labels, i, c - 1, self.k, rng, replace=self.replace)
                if not ids:
                    lonely.append(c)
                partners[c] = [loaded[j] if j in loaded else loaded.setdefault(j, self._image(j)) for j in ids]
        return {"name": item["name"], "index": i, "size": tuple(item["image"].shape[-2:]),
                "image": self.transform(item["image"]).as_subclass(torch.Tensor),
                "classes": classes, "partners": partners, "lonely": lonely}


def _first(batch: list):
    return batch[0]


EXPLAIN = {"classifier": "classifier.pt"}  # what a changed key of settings.json means


def state(cfg: MapsConfig | dict) -> tuple[str, str]:
    """What ``run(cfg)`` would do ("keep", "resume", "recompute" or "run") and why; reads RUN only."""
    cfg = C.from_dict(MapsConfig, cfg) if isinstance(cfg, dict) else cfg
    run_dir, out_dir = Path(cfg.run_dir), Path(cfg.run_dir) / cfg.maps_dir
    if not (run_dir / R.CLASSIFIER).is_file():
        return ("recompute" if (out_dir / R.SETTINGS).is_file() else "run"), "no classifier.pt yet"
    names = VOCDataset(cfg.data_root, cfg.split, with_mask=False).names[:cfg.limit]
    files = [maps_path(out_dir, n).name for n in names]
    return folder_state(out_dir, R.SETTINGS, _settings(cfg, run_dir / R.CLASSIFIER), files, cfg.overwrite, EXPLAIN)


def run(cfg: MapsConfig | dict) -> dict:
    """Write RUN/R.MAPS/NAME.npz for every image of ``cfg.split`` (skipping finished ones)
    and the settings to RUN/config_maps.yaml (config_NAME.yaml for another maps_dir NAME).

    Returns {"num_images" (computed now), "num_skipped", "num_no_partner" (classes without
    a partner), "seconds", "images_per_s", "maps_dir"}.
    """
    cfg = C.from_dict(MapsConfig, cfg) if isinstance(cfg, dict) else cfg
    kinds = parse_combine(cfg.combine)
    check_self_transforms(cfg.self_transforms)
    with_partners = "coatt" in kinds or cfg.aggregate == "reference"
    if cfg.k < 1 and with_partners:
        raise ValueError(f"k={cfg.k}: cross-image maps need at least one partner per class (k >= 1)")
    if cfg.aggregate == "reference" and tuple(cfg.scales) != (1.0,):
        raise ValueError(f"scales={list(cfg.scales)}: aggregate=reference uses one scale, as the reference does; "
                         f"set scales: [1.0] or aggregate: mean")
    run_dir = Path(cfg.run_dir)
    checkpoint = R.trained(run_dir, "classifier")  # raises, saying how to train or resume, when missing
    out_dir = run_dir / cfg.maps_dir
    settings = _settings(cfg, checkpoint)
    check_settings(out_dir, R.SETTINGS, settings, cfg.overwrite, "maps", "maps_dir", EXPLAIN, "*.npz")

    base = VOCDataset(cfg.data_root, cfg.split, transforms=None, with_mask=False)
    inputs = MapInputs(base, eval_transforms(cfg.image_size), cfg.k, cfg.seed, with_partners,
                       replace=cfg.partners == "replace")
    count = len(base) if cfg.limit is None else min(len(base), max(0, cfg.limit))
    todo = [i for i in range(count) if cfg.overwrite or not maps_path(out_dir, base.names[i]).is_file()]
    write_json(out_dir / R.SETTINGS, settings)
    log.info("maps (%s) of %d %s images into %s: %d to compute, %d already there", "+".join(kinds), count,
             cfg.split, out_dir, len(todo), count - len(todo))

    C.save_yaml(cfg, run_dir / R.folder_config(out_dir))
    provenance.record(run_dir, out_dir.name)
    device = distributed.resolve_device(cfg.device)
    model = load_classifier(checkpoint, device)  # in eval mode
    loader = DataLoader(Subset(inputs, todo), batch_size=1, shuffle=False, num_workers=cfg.workers, collate_fn=_first)
    lonely, t0 = 0, time.perf_counter()
    for item in progress(loader, desc=f"maps {cfg.split}", total=len(todo)):
        if item["lonely"]:
            if not lonely:
                log.warning("image %s: no other %s image contains class(es) %s, so they get no cross-image map "
                            "(the other kinds decide; with combine=('coatt',) the self-pair maps stand in). "
                            "Logged once; the total is returned as num_no_partner.", item["name"], cfg.split,
                            item["lonely"])
            lonely += len(item["lonely"])
        with distributed.autocast(device, cfg.amp):
            maps = localization_maps(model, item["image"][None], item["classes"], item["partners"], kinds,
                                     cfg.scales, out_size=item["size"], self_transforms=cfg.self_transforms,
                                     batch=cfg.batch, aggregate=cfg.aggregate)
        save_maps(maps_path(out_dir, item["name"]), maps.cpu().numpy(), item["classes"])
    seconds = time.perf_counter() - t0
    result = {"num_images": len(todo), "num_skipped": count - len(todo), "num_no_partner": lonely,
              "seconds": round(seconds, 3), "images_per_s": round(len(todo) / seconds, 3) if todo else 0.0,
              "maps_dir": str(out_dir)}
    log.info("maps done: %s", result)
    return result


# =========================================================================== command line

