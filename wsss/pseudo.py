"""Pseudo ground truth from localization maps (METHOD.md section 3): pure functions.

Input for one image: ``maps`` (K', H, W), the localization maps of the image's K'
ground-truth classes, each rectified and normalised by its maximum so that it lies in
[0, 1] (METHOD.md section 2), already resized to the image; ``class_ids`` (K',), the
label id (1..K) of each map; optionally the RGB image (for the CRF) and a saliency map.
Output: a uint8 (H, W) mask, 0 background, 1..K classes, 255 ignore.

The exact rules of :func:`scores_to_mask`, in order (``p`` = :class:`PseudoMaskParams`):

1. Floor. Class score S_k = M_k where M_k >= p.score_floor, else 0 (scores strictly
   below the floor are dropped).
2. Background score B (:func:`background_score`), from the maps before the floor:
   - "power":     B = (1 - max_k M_k) ** p.alpha   (PSA / IRN style; B = 1 with no classes)
   - "threshold": B = p.bg_threshold everywhere
   - "saliency":  B = 1 - saliency  (the reference pipeline's background cue)
3. Conflict. Pixels where at least two class scores S_k are strictly above
   p.conflict are marked (the background channel does not count).
4. Labels. Without CRF: argmax over the stack [B, S_1, ..., S_K'] (ties go to the
   lower index, so background wins a tie). With ``p.use_crf``: the stack plus
   :data:`EPS` is divided by its sum over channels to a per-pixel distribution,
   refined by :func:`wsss.crf.dense_crf`, and the argmax is taken. (PSA feeds the raw
   scores to ``unary_from_softmax``; dividing by the sum changes the unary only by a
   per-pixel constant, which mean-field inference ignores, and keeps every pixel a
   proper distribution even where all scores are 0.) Channel 0 -> label 0, channel k
   -> ``class_ids[k - 1]``.
5. Conflicted pixels (rule 3) become 255, whatever the CRF said.
6. Saliency mode only: pixels with saliency > p.saliency_threshold whose final label
   (after the CRF, if any) is background become 255 ("salient pixels left as
   background"). The rule reads the final label so that the saved mask never calls a
   salient pixel background.
7. If the foreground pixels (labels other than 0 and 255) are fewer than
   p.min_fg_fraction of all pixels, the whole image becomes 255 (strictly fewer:
   exactly 1% is kept; 0 disables the rule). An image with no classes is therefore
   ignored whole unless the rule is disabled.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Sequence

import numpy as np

from wsss import config as C
from wsss.classes import IGNORE_INDEX
from wsss.crf import CRFParams, dense_crf

BG_MODES = ("power", "threshold", "saliency")
#: added to every score before the stack is normalised for the CRF
EPS = 1e-5
#: maps may exceed [0, 1] by this much (float error of the max-normalisation) and are clipped
RANGE_TOLERANCE = 1e-4


@dataclass
class PseudoMaskParams:
    """How localization maps become a mask (METHOD.md section 3); rules in the module docstring.

    Defaults: ``alpha=4`` is PSA's ``low_alpha`` (``infer_cls.py``; its ``high_alpha`` is
    32); ``bg_threshold=0.2`` is PSA's constant background score for its CAM-only masks;
    ``score_floor=0.3``, ``conflict=0.99`` and ``min_fg_fraction=0.01`` are METHOD.md's
    saliency-pipeline values. ``saliency_threshold`` decides which pixels count as
    salient for rule 6 (saliency mode only).
    """

    bg_mode: str = C.setting("power", f"background score: {' | '.join(BG_MODES)}")
    alpha: float = C.setting(4.0, "power of the background score (1 - max_c M_c)^alpha", allowed="> 0")
    bg_threshold: float = C.setting(0.2, "constant background score (bg_mode=threshold)", allowed="[0, 1]")
    saliency_threshold: float = C.setting(
        0.5, "saliency above which a pixel may not be background (bg_mode=saliency)", allowed="[0, 1]")
    score_floor: float = C.setting(0.3, "class scores below this are dropped", allowed="[0, 1]")
    conflict: float = C.setting(0.99, "pixels with two class scores above this are ignored (255)", allowed="[0, 1]")
    min_fg_fraction: float = C.setting(
        0.01, "images with less foreground than this fraction are ignored whole", allowed="[0, 1]")
    use_crf: bool = C.setting(True, "refine the scores with a dense CRF")
    crf: CRFParams = C.setting(factory=CRFParams)

    def __post_init__(self) -> None:
        if self.bg_mode not in BG_MODES:
            raise ValueError(f"PseudoMaskParams.bg_mode must be one of {BG_MODES}, got {self.bg_mode!r}")


def _check_unit_range(name: str, array: np.ndarray) -> np.ndarray:
    array = np.asarray(array, dtype=np.float32)
    if not np.all(np.isfinite(array)):
        raise ValueError(f"{name} contains NaN or inf")
    if array.size and (array.min() < -RANGE_TOLERANCE or array.max() > 1 + RANGE_TOLERANCE):
        raise ValueError(f"{name} must lie in [0, 1] (got {array.min():.4g}..{array.max():.4g}): "
                         "normalise each map by its maximum after a ReLU (METHOD.md section 2)")
    return np.clip(array, 0.0, 1.0)


def background_score(maps: np.ndarray, params: PseudoMaskParams, saliency: np.ndarray | None = None) -> np.ndarray:
    """Background score B (H, W) float32 (rule 2 of the module docstring).

    ``maps`` (K', H, W) in [0, 1], before the score floor; ``saliency`` (H, W) in [0, 1]
    is required in "saliency" mode and ignored otherwise.
    """
    maps = _check_unit_range("maps", maps)
    height, width = maps.shape[1:]
    if params.bg_mode == "power":
        peak = maps.max(axis=0) if maps.shape[0] else np.zeros((height, width), np.float32)
        return np.power(1.0 - peak, params.alpha).astype(np.float32)
    if params.bg_mode == "threshold":
        return np.full((height, width), params.bg_threshold, dtype=np.float32)
    if saliency is None:
        raise ValueError("bg_mode='saliency' needs a saliency map (H, W) in [0, 1]")
    saliency = _check_unit_range("saliency", saliency)
    if saliency.shape != (height, width):
        raise ValueError(f"saliency {saliency.shape} and maps {maps.shape} differ in size")
    return 1.0 - saliency


def score_stack(maps: np.ndarray, params: PseudoMaskParams, saliency: np.ndarray | None = None) -> np.ndarray:
    """The (1 + K', H, W) float32 stack [B, S_1, ..., S_K'] of rules 1 and 2."""
    maps = _check_unit_range("maps", maps)
    if maps.ndim != 3:
        raise ValueError(f"maps must be (K', H, W), got shape {maps.shape}")
    floored = np.where(maps >= params.score_floor, maps, 0.0).astype(np.float32)
    background = background_score(maps, params, saliency)
    return np.concatenate([background[None], floored], axis=0)


def conflict_mask(class_scores: np.ndarray, threshold: float) -> np.ndarray:
    """Rule 3: (H, W) bool, True where two or more of ``class_scores`` (K', H, W) exceed ``threshold``."""
    return (np.asarray(class_scores) > threshold).sum(axis=0) >= 2


def _argmax_labels(stack: np.ndarray, image: np.ndarray | None, params: PseudoMaskParams) -> np.ndarray:
    """Rule 4: channel index per pixel, from the stack or its CRF refinement."""
    if not params.use_crf:
        return np.argmax(stack, axis=0)
    if image is None:
        raise ValueError("scores_to_mask: use_crf=True needs the RGB image (H, W, 3) uint8")
    probs = stack + EPS
    probs /= probs.sum(axis=0, keepdims=True)
    return np.argmax(dense_crf(image, probs, params.crf), axis=0)


def _check_class_ids(class_ids: Sequence[int], num_maps: int) -> np.ndarray:
    ids = np.asarray(list(class_ids), dtype=np.int64).reshape(-1)
    if ids.size != num_maps:
        raise ValueError(f"class_ids has {ids.size} entries but maps has {num_maps} channels")
    if ids.size and (ids.min() < 1 or ids.max() >= IGNORE_INDEX):
        raise ValueError(f"class_ids must be label ids 1..{IGNORE_INDEX - 1} (0 is background), got {ids.tolist()}")
    if len(set(ids.tolist())) != ids.size:
        raise ValueError(f"class_ids has repeated entries: {ids.tolist()}")
    return ids


def scores_to_mask(image: np.ndarray | None, maps: np.ndarray, class_ids: Sequence[int],
                   params: PseudoMaskParams | None = None, saliency: np.ndarray | None = None) -> np.ndarray:
    """The pseudo mask uint8 (H, W) of one image: rules 1-7 of the module docstring.

    ``image`` (H, W, 3) uint8 is needed only when ``params.use_crf``; ``maps`` (K', H, W)
    in [0, 1] are the normalised maps of the classes ``class_ids`` (label ids 1..K);
    ``saliency`` (H, W) in [0, 1] is needed only in "saliency" mode.
    """
    params = params or PseudoMaskParams()
    maps = np.asarray(maps)
    if maps.ndim != 3:
        raise ValueError(f"maps must be (K', H, W), got shape {maps.shape}")
    ids = _check_class_ids(class_ids, maps.shape[0])
    if image is not None and np.asarray(image).shape[:2] != maps.shape[1:]:
        raise ValueError(f"image {np.asarray(image).shape} and maps {maps.shape} differ in size")

    stack = score_stack(maps, params, saliency)
    conflicted = conflict_mask(stack[1:], params.conflict)
    channel = _argmax_labels(stack, image, params)

    lookup = np.concatenate([[0], ids]).astype(np.uint8)
    mask = lookup[channel]
    mask[conflicted] = IGNORE_INDEX
    if params.bg_mode == "saliency":
        salient = np.asarray(saliency, dtype=np.float32) > params.saliency_threshold
        mask[salient & (mask == 0)] = IGNORE_INDEX
    foreground = np.count_nonzero((mask != 0) & (mask != IGNORE_INDEX))
    if foreground < params.min_fg_fraction * mask.size:
        mask[:] = IGNORE_INDEX
    return mask


def crf_params_for(params: PseudoMaskParams, size: tuple[int, int], scale: bool) -> PseudoMaskParams:
    """``params`` with the CRF spatial widths scaled to an image of ``size`` (H, W) when ``scale``
    (:meth:`wsss.crf.CRFParams.for_size`)."""
    return replace(params, crf=params.crf.for_size(size)) if scale else params


def mask_counts(mask: np.ndarray) -> dict:
    """Pixel counts of a pseudo mask: all, ignored (255) and foreground (1..K)."""
    ignored = int(np.count_nonzero(mask == IGNORE_INDEX))
    return {"pixels": int(mask.size), "ignored": ignored,
            "foreground": int(mask.size) - ignored - int(np.count_nonzero(mask == 0))}
