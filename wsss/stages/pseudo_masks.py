"""Stage 3: pseudo ground-truth masks from the localization maps (METHOD.md section 3).

For every image of the split, ``run(cfg)`` reads its maps (RUN/maps/NAME.npz, written by
:mod:`wsss.stages.make_maps`), the image and, in saliency mode, a saliency map, applies
the rules of :func:`wsss.pseudo.scores_to_mask` (score floor, background score, conflict
pixels, dense CRF, minimum foreground) and saves a VOC palette PNG (0 background, 1..K
classes, 255 ignore) to RUN/pseudo/NAME.png.

Files and re-runs:
- Each PNG is written atomically (``save_mask``: a temporary file, then ``os.replace``),
  so an interrupted run leaves only finished masks; re-running skips the images whose
  PNG exists and computes the rest. Temporary files of processes that died are removed.
- RUN/pseudo/settings.json records what the masks depend on (the rule parameters, the
  saliency folder and the maps folder's own settings.json). A re-run with other settings
  is refused instead of silently mixing masks made two ways; ``overwrite=True``
  recomputes everything.

Background cue: ``bg_mode="power"`` (default, no extra input: B = (1 - max_c M_c)^alpha,
as PSA and IRN), ``"threshold"`` (a constant), or ``"saliency"`` (the reference
pipeline: B = 1 - saliency, read from ``saliency_dir/NAME.png``, 0-255 greyscale).

Workers are processes (the CRF is single-threaded C++), started with multiprocessing's
default method (fork on Linux: no re-import; spawn on macOS); they run numpy, PIL and the
CRF only, no torch operations. ``workers <= 1`` runs in this process. The masks do not
depend on the number of workers.
"""

from __future__ import annotations

import json
import logging
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, fields
from functools import partial
from pathlib import Path
from typing import Literal

import numpy as np

from wsss import config as C
from wsss import provenance
from wsss import rundir as R
from wsss.crf import CRF_REFERENCE_SIZE
from wsss.data.voc import IMAGE_DIR, VOCDataset, load_image, load_mask, load_saliency, save_mask
from wsss.files import check_current, check_settings, folder_state, remove_stale_tmp, write_json
from wsss.maps import load_maps, maps_path
from wsss.progress import progress
from wsss.pseudo import BG_MODES, PseudoMaskParams, crf_params_for, mask_counts, scores_to_mask

log = logging.getLogger(__name__)


# =========================================================================== config

@dataclass(kw_only=True)
class PseudoConfig(PseudoMaskParams):
    """Settings of the pseudo-mask stage (METHOD.md section 3).

    ``maps_dir`` / ``out_dir``: folders inside ``run_dir`` (or absolute paths).
    The rule parameters (``bg_mode`` ... ``min_fg_fraction``, ``use_crf``, ``crf``) are
    inherited from :class:`wsss.pseudo.PseudoMaskParams` (one definition, one set of
    defaults); see :mod:`wsss.pseudo` for the rules.
    ``limit``: only the first ``limit`` images of the split (a quick look).
    """

    data_root: str = C.setting(help="dataset root in VOC layout")
    run_dir: str = C.setting(help="run directory holding the maps folder")
    split: str = C.setting("train", "split whose images get pseudo masks (ImageSets/Segmentation/SPLIT.txt)")
    maps_dir: str = C.setting(R.MAPS, "localization maps folder inside the run directory (or an absolute path)")
    out_dir: str = C.setting(R.PSEUDO, "output folder inside the run directory (or an absolute path)")
    saliency_dir: str | None = C.setting(None, "folder of saliency maps NAME.png (0-255), for bg_mode=saliency")
    # the rules: the fields of wsss.pseudo.PseudoMaskParams (inherited); bg_mode narrowed for the CLI
    bg_mode: Literal["power", "threshold", "saliency"] = C.setting(
        "power", f"background score: {' | '.join(BG_MODES)}")
    crf_scale: bool = C.setting(True, f"scale the CRF spatial widths by max(H, W) / {CRF_REFERENCE_SIZE} per image")
    # machinery
    workers: int = C.setting(2, "worker processes (<= 1: in this process)", allowed=">= 0")
    limit: int | None = C.setting(None, "only the first N images of the split", allowed=">= 0")
    overwrite: bool = C.setting(False, "recompute masks that already exist")

    def mask_params(self) -> PseudoMaskParams:
        """The rule parameters as :class:`wsss.pseudo.PseudoMaskParams` (checks ``bg_mode``)."""
        return PseudoMaskParams(**{f.name: getattr(self, f.name) for f in fields(PseudoMaskParams)})


# =========================================================================== files

def _read_maps(path: Path, image_path: Path, size: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    maps, classes = load_maps(path)
    if maps.shape[1:] != tuple(size):
        raise ValueError(f"localization maps {path} are {maps.shape[2]}x{maps.shape[1]} but image {image_path} "
                         f"is {size[1]}x{size[0]}: they were made from other images; re-run the maps stage "
                         f"with overwrite=True")
    return maps, classes


@dataclass
class _Job:
    """Everything a worker needs to make one image's mask (picklable, sent once per chunk)."""

    image_dir: Path
    maps_dir: Path
    out_dir: Path
    saliency_dir: Path | None
    num_classes: int
    params: PseudoMaskParams
    crf_scale: bool
    overwrite: bool


def make_one(job: _Job, name: str) -> dict:
    """Compute and save (or, when its PNG exists, read back) the mask of image ``name``.

    Returns ``{"name", "skipped"}`` and the pixel counts of :func:`mask_counts`. Runs in
    worker processes: numpy, PIL and the CRF only, no torch operations (safe in a forked
    child of a process that used torch).
    """
    out = job.out_dir / f"{name}.png"
    skipped = out.is_file() and not job.overwrite
    if skipped:
        mask = load_mask(out, job.num_classes)
    else:
        image_path = job.image_dir / f"{name}.jpg"
        image = load_image(image_path)
        size = image.shape[:2]
        maps, classes = _read_maps(maps_path(job.maps_dir, name), image_path, size)
        saliency = load_saliency(job.saliency_dir / f"{name}.png", size) if job.saliency_dir else None
        params = crf_params_for(job.params, size, job.crf_scale)
        mask = scores_to_mask(image, maps, classes, params, saliency)
        save_mask(out, mask)
    return {"name": name, "skipped": skipped, **mask_counts(mask)}


def _settings(cfg: PseudoConfig, maps_dir: Path) -> dict:
    """What the masks depend on; the maps folder's own settings stand for the maps."""
    maps_settings = maps_dir / R.SETTINGS
    return {"params": C.to_dict(cfg.mask_params()), "crf_scale": cfg.crf_scale,
            "saliency_dir": str(cfg.saliency_dir) if cfg.saliency_dir else None,
            "maps": json.loads(maps_settings.read_text()) if maps_settings.is_file() else None}


# =========================================================================== stage

def _results(job: _Job, names: list[str], workers: int):
    """Yield make_one's result for every name, in order: in this process, or from worker
    processes (multiprocessing's default start method; chunks of names per task)."""
    fn = partial(make_one, job)
    if workers <= 1 or len(names) <= 1:
        yield from map(fn, names)
        return
    chunk = max(1, min(32, len(names) // (4 * workers)))
    pool = ProcessPoolExecutor(max_workers=workers)
    try:
        yield from pool.map(fn, names, chunksize=chunk)
    finally:
        # On an error or interrupt: running chunks finish (save_mask never leaves half a
        # file), queued ones are dropped.
        pool.shutdown(wait=True, cancel_futures=True)


def summary(results: list[dict], seconds: float) -> dict:
    """Sums of :func:`make_one`'s results over the split (quality against ground truth is
    the evaluation stage's job: ``wsss.evaluation.evaluate_masks``)."""
    computed = sum(not r["skipped"] for r in results)
    pixels = sum(r["pixels"] for r in results)
    return {"num_images": computed, "num_skipped": len(results) - computed, "seconds": round(seconds, 3),
            "images_per_s": round(computed / seconds, 3) if computed and seconds > 0 else 0.0,
            "ignored_fraction": sum(r["ignored"] for r in results) / pixels if pixels else None,
            "fg_fraction": sum(r["foreground"] for r in results) / pixels if pixels else None,
            "num_all_ignored": sum(r["ignored"] == r["pixels"] for r in results)}


EXPLAIN = {"maps": "the maps"}  # what a changed key of settings.json means


def state(cfg: PseudoConfig | dict) -> tuple[str, str]:
    """What ``run(cfg)`` would do ("keep", "resume", "recompute" or "run") and why; reads RUN only."""
    cfg = C.from_dict(PseudoConfig, cfg) if isinstance(cfg, dict) else cfg
    run_dir = Path(cfg.run_dir)
    names = VOCDataset(cfg.data_root, cfg.split, with_mask=False).names
    names = names if cfg.limit is None else names[:max(0, cfg.limit)]
    return folder_state(run_dir / cfg.out_dir, R.SETTINGS, _settings(cfg, run_dir / cfg.maps_dir),
                        [f"{n}.png" for n in names], cfg.overwrite, EXPLAIN)


def run(cfg: PseudoConfig | dict) -> dict:
    """Write RUN/OUT_DIR/NAME.png for every image of ``cfg.split`` (skipping finished ones)
    and the settings to RUN/config_pseudo.yaml (config_NAME.yaml for another out_dir NAME).

    Returns {"num_images" (computed now), "num_skipped", "seconds", "images_per_s",
    "ignored_fraction", "fg_fraction" (over all pixels of all the split's masks, new and
    skipped), "num_all_ignored" (images ignored whole), "out_dir"}. Their quality against
    ground truth: ``wsss.evaluation.evaluate_masks``.
    """
    cfg = C.from_dict(PseudoConfig, cfg) if isinstance(cfg, dict) else cfg
    params = cfg.mask_params()
    if params.bg_mode == "saliency" and not cfg.saliency_dir:
        raise ValueError("bg_mode='saliency' needs saliency_dir (a folder of NAME.png saliency maps); "
                         "without saliency use bg_mode='power'")
    run_dir = Path(cfg.run_dir)
    maps_dir, out_dir = run_dir / cfg.maps_dir, run_dir / cfg.out_dir
    dataset = VOCDataset(cfg.data_root, cfg.split, transforms=None, with_mask=False)
    names = dataset.names if cfg.limit is None else dataset.names[:max(0, cfg.limit)]
    R.require_files(maps_dir, names, ".npz", "localization maps",
                    f"run the maps stage first (python -m wsss make-maps --data-root {cfg.data_root} "
                    f"--run-dir {run_dir} --split {cfg.split}, or wsss.stages.make_maps.run)")
    saliency_dir = Path(cfg.saliency_dir) if cfg.saliency_dir and params.bg_mode == "saliency" else None
    if saliency_dir is not None:
        R.require_files(saliency_dir, names, ".png", "saliency map",
                        "put one 0-255 PNG per image there (named like the image), or use bg_mode='power'")
    settings = _settings(cfg, maps_dir)
    check_current(settings["maps"], run_dir, f"the maps in {maps_dir}",
                  f"make them again (python -m wsss make-maps --data-root {cfg.data_root} --run-dir {run_dir} "
                  f"--maps-dir {cfg.maps_dir} --overwrite), then these pseudo-masks (--overwrite)")
    check_settings(out_dir, R.SETTINGS, settings, cfg.overwrite, "pseudo masks", "out_dir", EXPLAIN, "*.png")
    write_json(out_dir / R.SETTINGS, settings)
    C.save_yaml(cfg, run_dir / R.folder_config(out_dir))
    provenance.record(run_dir, out_dir.name)
    if stale := remove_stale_tmp(out_dir, "*.png"):
        log.info("removed %d temporary file(s) of an interrupted run from %s", stale, out_dir)

    job = _Job(image_dir=dataset.root / IMAGE_DIR, maps_dir=maps_dir, out_dir=out_dir, saliency_dir=saliency_dir,
               num_classes=dataset.num_classes, params=params, crf_scale=cfg.crf_scale, overwrite=cfg.overwrite)
    todo = sum(1 for n in names if cfg.overwrite or not (out_dir / f"{n}.png").is_file())
    workers = max(1, min(cfg.workers, todo))
    log.info("pseudo masks of %d %s images into %s: %d to compute, %d already there (%s, CRF %s, %d worker(s))",
             len(names), cfg.split, out_dir, todo, len(names) - todo, params.bg_mode,
             "on" if params.use_crf else "off", workers)

    t0 = time.perf_counter()
    results = list(progress(_results(job, names, workers), total=len(names), desc=f"pseudo masks {cfg.split}"))
    metrics = {**summary(results, time.perf_counter() - t0), "out_dir": str(out_dir)}
    log.info("pseudo masks done: %s", metrics)
    _warn_if_mostly_ignored(metrics, len(names), maps_dir)
    return metrics


def _warn_if_mostly_ignored(metrics: dict, num_images: int, maps_dir: Path) -> None:
    """Masks that are 255 (nearly) everywhere teach the segmenter nothing: say so and why."""
    if num_images and metrics["num_all_ignored"] > num_images // 2:
        log.warning("%d of %d pseudo masks are ignored whole (255 everywhere: under min_fg_fraction foreground, "
                    "or conflicting classes); the segmenter learns nothing from them. The localization maps in "
                    "%s are probably (nearly) empty or flat: train the classifier longer, or lower "
                    "min_fg_fraction / score_floor.", metrics["num_all_ignored"], num_images, maps_dir)
