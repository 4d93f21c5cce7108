"""mIoU of localization maps, pseudo masks and a segmenter on a split (METHOD.md sections 2-4).

Every number here is a mean IoU over K + 1 classes from one confusion matrix summed over
all pixels of a split (``wsss.metrics.ConfusionMatrix``), never a mean of per-image IoUs;
ground-truth pixels labelled 255 are left out.

- Localization maps (sec. 2), as the field reports them (PSA, IRN): a pixel is background
  where the largest map of the image's classes is below a threshold, else the class of the
  largest map. The threshold is swept, one confusion matrix per threshold, and the best
  one is reported with its per-class IoU.
- Pseudo masks (sec. 3): the PNGs of the pseudo-mask stage against the ground truth. A
  pseudo mask's 255 ("not sure") pixels count as *background predictions* in ``miou``, as
  IRN's ``eval_sem_seg.py`` does, so that a mask cannot raise its score by ignoring the
  hard pixels. ``coverage`` is the fraction of pseudo-mask pixels that are not 255, and
  ``miou_confident`` the mIoU over those pixels only (what the segmenter trains on).
- Segmenter (sec. 4): predictions of ``wsss.models.segmenter.predict`` (multi-scale,
  optional flips), with and without a dense CRF (``wsss.crf``).

The evaluation stage (``wsss.stages.evaluate``) runs these on a run directory's files. The
training stages' per-epoch numbers on a (possibly sharded) val loader are here too: the
classifier's image-level mAP (``evaluate_map``) and the segmenter's single-scale mIoU
(``evaluate_miou``).
"""

from __future__ import annotations

import itertools
import logging
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torchvision import tv_tensors

from wsss import distributed
from wsss.classes import IGNORE_INDEX
from wsss.crf import CRFParams, crf_labels
from wsss.data.transforms import eval_transforms
from wsss.data.voc import class_names, load_image, load_mask, mask_dir, read_split
from wsss.maps import load_maps, maps_path
from wsss.metrics import ConfusionMatrix, average_precision, mean_average_precision
from wsss.models.segmenter import predict
from wsss.progress import progress

log = logging.getLogger(__name__)

#: 0.05, 0.10, ..., 0.90
DEFAULT_THRESHOLDS = tuple(round(float(t), 4) for t in np.arange(0.05, 0.95, 0.05))


# =========================================================================== labels and summaries

def peak_and_labels(maps, classes) -> tuple[np.ndarray, np.ndarray]:
    """(largest map value (H, W) float32, id of the largest map (H, W) int64; the first one on
    ties) of localization maps (n, H, W) of the label ids ``classes``. No maps: zeros."""
    maps = np.asarray(maps, dtype=np.float32)
    classes = np.asarray(classes, dtype=np.int64).reshape(-1)
    if maps.ndim != 3 or maps.shape[0] != classes.size:
        raise ValueError(f"maps {maps.shape} must be (n, H, W) with n = {classes.size} classes")
    if classes.size == 0:
        return np.zeros(maps.shape[1:], np.float32), np.zeros(maps.shape[1:], np.int64)
    return maps.max(axis=0), classes[maps.argmax(axis=0)]


def maps_to_labels(maps, classes, bg_threshold: float) -> np.ndarray:
    """Label map (H, W) int64 from localization maps (n, H, W) of the label ids ``classes``:
    background (0) where the largest map is below ``bg_threshold``, else the id of the
    largest map (the first one on ties). No maps: all background."""
    peak, labels = peak_and_labels(maps, classes)
    return np.where(peak < bg_threshold, 0, labels)


def iou_by_name(iou: Sequence[float], names: Sequence[str]) -> dict[str, float | None]:
    """{"background": IoU, class name: IoU, ...}; None where a class never occurred (NaN)."""
    return {n: _finite(v) for n, v in zip(["background", *names], iou, strict=True)}


def _finite(v) -> float | None:
    return None if v is None or not math.isfinite(float(v)) else float(v)


def _summary(cm: ConfusionMatrix, names: Sequence[str]) -> dict:
    m = cm.compute()
    return {"miou": _finite(m["miou"]), "pixel_acc": _finite(m["pixel_acc"]), "iou": iou_by_name(m["iou"], names)}


# =========================================================================== ground truth

def _split_items(data_root, split: str, pred_path, allow_missing: bool, what: str, fix: str):
    """(names with a prediction file, class names, number missing); raises when files are
    missing unless ``allow_missing``, and when none is found."""
    root = Path(data_root)
    names_fg = class_names(root)
    names, _ = read_split(root, split, len(names_fg))
    present = [n for n in names if pred_path(n).is_file()]
    missing = len(names) - len(present)
    if missing and not allow_missing:
        first = next(pred_path(n) for n in names if not pred_path(n).is_file())
        raise FileNotFoundError(f"{missing} of {len(names)} {split} images have no {what} (e.g. {first}): {fix}, "
                                f"or pass allow_missing=True to evaluate the {len(present)} that exist")
    if not present:
        raise FileNotFoundError(f"no {what} found for any {split} image (e.g. {pred_path(names[0])}): {fix}")
    if missing:
        log.warning("%d of %d %s images have no %s; evaluating the %d that do", missing, len(names), split, what,
                    len(present))
    return present, names_fg, missing


def _gt_mask(root: Path, split: str, name: str, num_classes: int, shape, pred_file) -> np.ndarray:
    path = mask_dir(root, split) / f"{name}.png"
    mask = load_mask(path, num_classes)
    if shape is not None and mask.shape != tuple(shape):
        raise ValueError(f"{pred_file} is {shape[1]}x{shape[0]} but the ground truth {path} is "
                         f"{mask.shape[1]}x{mask.shape[0]}: the prediction must have the image's size "
                         f"(re-run the stage that wrote it)")
    return mask


# =========================================================================== maps

def evaluate_maps(data_root, split: str, maps_dir, thresholds: Sequence[float] = DEFAULT_THRESHOLDS, *,
                  allow_missing: bool = False) -> dict:
    """mIoU of the localization maps in ``maps_dir`` for each background threshold.

    Returns {"split", "num_images", "num_missing", "sweep": [{"threshold", "miou",
    "pixel_acc"}, ...], "best_threshold", "miou", "pixel_acc", "iou" (per class at the
    best threshold, by name)}; the best threshold is the first one with the highest mIoU.
    """
    thresholds = [float(t) for t in thresholds]
    if not thresholds:
        raise ValueError("thresholds is empty")
    root, maps_dir = Path(data_root), Path(maps_dir)
    names, names_fg, missing = _split_items(
        root, split, lambda n: maps_path(maps_dir, n), allow_missing, f"localization maps in {maps_dir}",
        "run the maps stage (wsss.stages.make_maps) for this split")
    num = len(names_fg) + 1
    cms = [ConfusionMatrix(num) for _ in thresholds]
    for name in progress(names, desc=f"eval maps {split}", leave=False):
        path = maps_path(maps_dir, name)
        maps, classes = load_maps(path)
        gt = torch.from_numpy(_gt_mask(root, split, name, len(names_fg), maps.shape[1:], path))
        peak, labels = peak_and_labels(maps, classes)  # maps_to_labels, shared by every threshold
        for t, cm in zip(thresholds, cms):
            cm.update(torch.from_numpy(np.where(peak < t, 0, labels)), gt)
    results = [cm.compute() for cm in cms]
    scores = [r["miou"] if math.isfinite(r["miou"]) else -1.0 for r in results]
    best = int(np.argmax(scores))
    return {"split": split, "num_images": len(names), "num_missing": missing,
            "sweep": [{"threshold": t, "miou": _finite(r["miou"]), "pixel_acc": _finite(r["pixel_acc"])}
                      for t, r in zip(thresholds, results)],
            "best_threshold": thresholds[best], **_summary(cms[best], names_fg)}


# =========================================================================== pseudo masks

def evaluate_masks(data_root, split: str, masks_dir, *, allow_missing: bool = False) -> dict:
    """mIoU of the pseudo masks MASKS_DIR/NAME.png against the ground truth of ``split``.

    ``miou`` counts a pseudo mask's 255 pixels as background (IRN's convention);
    ``miou_confident`` leaves them out; ``coverage`` is the fraction of non-255 pixels;
    ``num_ignored_images`` counts masks that are 255 everywhere. Over the pixels with ground
    truth: ``fg_precision`` is the share of pixels a mask gives a class (1..K) that have that
    class, ``fg_recall`` the share of object pixels given their class, ``fg_share`` and
    ``gt_fg_share`` the shares of pixels the mask and the ground truth call foreground.
    """
    root, masks_dir = Path(data_root), Path(masks_dir)
    path_of = lambda n: masks_dir / f"{n}.png"  # noqa: E731
    names, names_fg, missing = _split_items(root, split, path_of, allow_missing, f"pseudo masks in {masks_dir}",
                                            "run the pseudo-mask stage for this split")
    k = len(names_fg)
    cm_all, cm_confident = ConfusionMatrix(k + 1), ConfusionMatrix(k + 1)
    covered = total = ignored_images = 0
    fg = dict.fromkeys(("hit", "pred", "true", "valid"), 0)  # pixel counts with ground truth
    for name in progress(names, desc=f"eval pseudo {split}", leave=False):
        pred = load_mask(path_of(name), k)
        gt = _gt_mask(root, split, name, k, pred.shape, path_of(name))
        sure = pred != IGNORE_INDEX
        covered, total = covered + int(sure.sum()), total + sure.size
        ignored_images += int(not sure.any())
        valid, pred_fg = gt != IGNORE_INDEX, sure & (pred > 0)
        for key, pixels in (("hit", pred_fg & (pred == gt)), ("pred", pred_fg & valid),
                            ("true", valid & (gt > 0)), ("valid", valid)):
            fg[key] += int(pixels.sum())
        cm_all.update(torch.from_numpy(np.where(sure, pred, 0)), torch.from_numpy(gt))
        cm_confident.update(torch.from_numpy(np.where(sure, pred, 0)),
                            torch.from_numpy(np.where(sure, gt, IGNORE_INDEX)))
    confident = _summary(cm_confident, names_fg)
    return {"split": split, "num_images": len(names), "num_missing": missing, **_summary(cm_all, names_fg),
            "coverage": covered / total if total else None, "num_ignored_images": ignored_images,
            "miou_confident": confident["miou"], "pixel_acc_confident": confident["pixel_acc"],
            "iou_confident": confident["iou"], "fg_precision": _ratio(fg["hit"], fg["pred"]),
            "fg_recall": _ratio(fg["hit"], fg["true"]), "fg_share": _ratio(fg["pred"], fg["valid"]),
            "gt_fg_share": _ratio(fg["true"], fg["valid"])}


def _ratio(a: int, b: int) -> float | None:
    return a / b if b else None


# =========================================================================== segmenter

@torch.no_grad()
def evaluate_segmenter(model, data_root, split: str = "val", crf: bool = False, scales: Sequence[float] = (1.0,),
                       flip: bool = False, *, crf_params: CRFParams | None = None, crf_scale: bool = True,
                       limit: int | None = None, amp: bool = False) -> dict:
    """mIoU of a segmentation model on ``split`` at native resolution, and with ``crf``
    also after a dense CRF on its softmax (``miou_crf``, ``pixel_acc_crf``, ``iou_crf``).

    ``crf_params`` default to :class:`wsss.crf.CRFParams` (PASCAL VOC settings); with
    ``crf_scale`` their spatial widths are scaled per image by max(H, W) / 500, as the
    pseudo-mask stage does (``wsss.pseudo.crf_params_for``).

    ``model`` maps (B, 3, H, W) to logits (B, K+1, H, W) and stays on its device; it is
    put in eval mode. ``limit``: only the first N images of the split.
    """
    root = Path(data_root)
    names_fg = class_names(root)
    names, _ = read_split(root, split, len(names_fg))
    names = names[:limit] if limit is not None else names
    if not names:
        raise ValueError(f"split {split} of {root} has no images to evaluate (limit={limit})")
    model.eval()
    device = next(model.parameters()).device
    to_input = eval_transforms(None)
    k = len(names_fg)
    cm, cm_crf = ConfusionMatrix(k + 1), ConfusionMatrix(k + 1)
    image_dir = root / "JPEGImages"
    for name in progress(names, desc=f"eval segmenter {split}", leave=False):
        image = load_image(image_dir / f"{name}.jpg")
        gt = torch.from_numpy(_gt_mask(root, split, name, k, image.shape[:2], image_dir / f"{name}.jpg"))
        x = to_input(tv_tensors.Image(torch.from_numpy(image).permute(2, 0, 1))).as_subclass(torch.Tensor)
        x = x[None].to(device)
        with distributed.autocast(device, amp):
            probs = predict(model, x, scales=tuple(scales), flip=flip)[0].float()
        if probs.shape[0] != k + 1:
            raise ValueError(f"the model predicts {probs.shape[0]} classes but {root} has {k} + background")
        cm.update(probs.argmax(0).cpu(), gt)
        if crf:
            params = crf_params or CRFParams()
            params = params.for_size(image.shape) if crf_scale else params
            cm_crf.update(torch.from_numpy(crf_labels(image, probs.cpu().numpy(), params)), gt)
    out = {"split": split, "num_images": len(names), "scales": [float(s) for s in scales], "flip": bool(flip),
           **_summary(cm, names_fg)}
    if crf:
        out.update({f"{key}_crf": value for key, value in _summary(cm_crf, names_fg).items()})
    return out


# =========================================================================== training-stage val scores

@torch.no_grad()
def predict_scores(model, loader, device: torch.device, *, amp: bool = True, channels_last: bool = False
                   ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(indices, sigmoid(s) (N, K), labels (N, K)) over ``loader``, s = GAP of the basic map S."""
    model.eval()
    idx, probs, labels = [], [], []
    for batch in loader:
        x = distributed.to_device(batch["image"], device, channels_last)
        with distributed.autocast(device, amp):
            s = model.cam(x).float().mean(dim=(2, 3))
        idx.append(torch.as_tensor(batch["index"]).cpu())
        probs.append(torch.sigmoid(s).cpu())
        labels.append(batch["label"].cpu())
    if not idx:
        k = getattr(model, "num_classes", 0)
        return np.zeros(0, int), np.zeros((0, k)), np.zeros((0, k))
    return torch.cat(idx).numpy(), torch.cat(probs).numpy(), torch.cat(labels).numpy()


def evaluate_map(model, loader, device: torch.device, *, amp: bool = True, channels_last: bool = False) -> dict:
    """Image-level classification mAP on a (possibly sharded) val loader: every rank scores
    its shard, the shards are gathered and de-duplicated by index."""
    parts = distributed.all_gather_objects(predict_scores(model, loader, device, amp=amp, channels_last=channels_last))
    idx = np.concatenate([p[0] for p in parts])
    _, first = np.unique(idx, return_index=True)
    probs = np.concatenate([p[1] for p in parts])[first]
    labels = np.concatenate([p[2] for p in parts])[first]
    return {"val/map": mean_average_precision(probs, labels),
            "val/ap": [_finite(a) for a in average_precision(probs, labels)]}


def same_size_groups(items: list[dict]) -> list[list[dict]]:
    """Runs of consecutive items whose images have one size (each becomes one forward pass)."""
    return [list(run) for _, run in itertools.groupby(items, key=lambda it: it["image"].shape)]


@torch.no_grad()
def evaluate_miou(model: nn.Module, loader, device: torch.device, num_classes: int, *, amp: bool = True,
                  channels_last: bool = False) -> dict:
    """mIoU over K + 1 classes of single-scale predictions on a (possibly sharded) val
    loader of list batches (``collate_fn=list``: VOC images differ in size): one confusion
    matrix per rank, summed over ranks."""
    model.eval()
    cm = ConfusionMatrix(num_classes + 1, device)
    for items in loader:
        for group in same_size_groups(items):
            x = distributed.to_device(torch.stack([it["image"].as_subclass(torch.Tensor) for it in group]), device,
                            channels_last)
            target = torch.stack([it["mask"].as_subclass(torch.Tensor) for it in group]).to(device)
            with distributed.autocast(device, amp):
                probs = predict(model, x)
            cm.update(probs.argmax(1), target)
    cm.mat = sum(distributed.all_gather_objects(cm.mat.cpu()))
    result = cm.compute()
    return {"val/miou": result["miou"], "val/pixel_acc": result["pixel_acc"],
            "val/iou": [_finite(v) for v in result["iou"]]}
