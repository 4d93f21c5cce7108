"""Where co-attention looks and where its maps land (the localisation diagnostics).

Three measurements, each a pure function of tensors with a hand-checkable meaning, and one
driver that runs them over pairs of a dataset with ground-truth masks:

- ``attention_mass``: for a pair sharing class c, how much of the attention that
  F_m^{m∩n} gathers with (A_mn, rows softmax over I_n, METHOD.md sec. 1) goes from each
  region of I_m (object of c / background) to each region of I_n: object->object,
  object->background, background->background, background->object.
- ``map_mass_shares``: the share of a (rectified) class map's mass on the object, on a
  band of ``band`` cells around it, on the class's context (the benchmark's part map,
  value 3) and on the rest; the same for the plain CAM and the co-attention map.
- ``head_responses``: what a class head (phi_0 or phi) answers, for class c, on features
  of pure background, of the band around the object and of the object.

``pair_diagnostics`` computes all three for one pair at the feature grid of the model;
``collect`` averages them over pairs (and ``summary_table`` prints them). Regions at the
feature grid come from the pixel masks by area: a cell belongs to the object when at
least half of its pixels do.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from wsss.data.pairs import PartnerIndex
from wsss.data.synth import PART_DIR, part_coverage, part_coverage_counts
from wsss.maps import load_maps, maps_path

CONTEXT_PART = 3  # the benchmark's part map: 3 = context band (wsss.data.synth.PART_NAMES)


def cell_fraction(mask: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """The fraction of each feature cell's pixels that are True in ``mask`` (H, W) -> grid."""
    m = torch.as_tensor(mask).float()[None, None]
    return F.adaptive_avg_pool2d(m, grid)[0, 0]


def dilate(region: torch.Tensor, cells: int) -> torch.Tensor:
    """Binary dilation of a (h, w) bool region by ``cells`` in the max (chessboard) norm."""
    if cells <= 0:
        return region.bool()
    k = 2 * cells + 1
    return F.max_pool2d(region.float()[None, None], k, stride=1, padding=cells)[0, 0] > 0


def _mean(values: torch.Tensor, region: torch.Tensor) -> float:
    """Mean of ``values`` over the True positions of ``region``; NaN for an empty region."""
    return float(values[region].mean()) if region.any() else float("nan")


def attention_mass(a_mn: torch.Tensor, obj_m: torch.Tensor, obj_n: torch.Tensor) -> dict[str, float]:
    """Mean attention mass between regions (each row of ``a_mn`` (HWm, HWn) sums to 1).

    ``obj_m`` (HWm,) and ``obj_n`` (HWn,) are bool: the object of the shared class in I_m
    and I_n; everything else counts as background. "obj->obj" is the mean over object
    positions i of I_m of sum_{j in object of I_n} A(i, j), and so on; a region without
    positions gives NaN. ``obj_area_n``: the object's share of I_n's positions (what a
    uniform attention would give to obj->obj).
    """
    a = a_mn.float()
    obj_m, obj_n = obj_m.bool().flatten(), obj_n.bool().flatten()
    to_obj = a[:, obj_n].sum(1)
    return {"obj->obj": _mean(to_obj, obj_m), "obj->bg": _mean(1 - to_obj, obj_m),
            "bg->bg": _mean(1 - to_obj, ~obj_m), "bg->obj": _mean(to_obj, ~obj_m),
            "obj_area_n": float(obj_n.float().mean())}


def map_mass_shares(cam: torch.Tensor, obj: torch.Tensor, context: torch.Tensor | None = None,
                    band: int = 1) -> dict[str, float]:
    """Shares of a class map's rectified mass: on the object, on the band of ``band`` cells
    around it, on context (cells outside object and band), on the rest. They sum to 1
    (all NaN for a map without positive mass)."""
    m = cam.float().clamp_min(0)
    obj = obj.bool()
    ring = dilate(obj, band) & ~obj
    ctx = (context.bool() if context is not None else torch.zeros_like(obj)) & ~obj & ~ring
    rest = ~(obj | ring | ctx)
    total = float(m.sum())
    if total <= 0:
        return {k: float("nan") for k in ("object", "band", "context", "rest")}
    return {"object": float(m[obj].sum()) / total, "band": float(m[ring].sum()) / total,
            "context": float(m[ctx].sum()) / total, "rest": float(m[rest].sum()) / total}


def head_responses(head: torch.nn.Module, feats: torch.Tensor, c: int, obj: torch.Tensor,
                   band: int = 1) -> dict[str, float]:
    """Mean response of ``head`` (a 1x1 conv to K) for class column ``c`` on the feature
    cells (feats (1, C, h, w)) of the object, of the band around it and of the background
    beyond the band."""
    with torch.no_grad():
        resp = head(feats)[0, c].float()
    obj = obj.bool()
    ring = dilate(obj, band) & ~obj
    bg = ~(obj | ring)
    return {"object": _mean(resp, obj), "band": _mean(resp, ring), "background": _mean(resp, bg)}


@torch.no_grad()
def pair_diagnostics(model, x_m: torch.Tensor, x_n: torch.Tensor, mask_m: torch.Tensor, mask_n: torch.Tensor,
                     c: int, part_m: torch.Tensor | None = None, band: int = 1) -> dict[str, float]:
    """All diagnostics of one pair sharing class id ``c`` (1..K): images (1, 3, H, W), masks
    (H, W) of class ids, ``part_m`` the part map of I_m (context = 3) when known. Keys are
    prefixed: ``att/`` attention mass, ``cam/`` and ``coatt/`` map shares, ``phi0/`` and
    ``phi/`` head responses on I_m's own features."""
    f_m, f_n = model.features([x_m, x_n])
    grid_m, grid_n = tuple(f_m.shape[-2:]), tuple(f_n.shape[-2:])
    obj_m = cell_fraction(mask_m == c, grid_m) >= 0.5
    obj_n = cell_fraction(mask_n == c, grid_n) >= 0.5
    ctx = cell_fraction(part_m == CONTEXT_PART, grid_m) >= 0.5 if part_m is not None else None
    co_m, _, a_mn, _ = model.coatt(f_m, f_n, return_attention=True, impl="explicit")
    out = {f"att/{k}": v for k, v in attention_mass(a_mn[0], obj_m.flatten(), obj_n.flatten()).items()}
    out.update({f"cam/{k}": v for k, v in map_mass_shares(model.phi0(f_m)[0, c - 1], obj_m, ctx, band).items()})
    out.update({f"coatt/{k}": v for k, v in map_mass_shares(model.phi(co_m)[0, c - 1], obj_m, ctx, band).items()})
    out.update({f"phi0/{k}": v for k, v in head_responses(model.phi0, f_m, c - 1, obj_m, band).items()})
    out.update({f"phi/{k}": v for k, v in head_responses(model.phi, f_m, c - 1, obj_m, band).items()})
    return out


def shared_class_pairs(labels: np.ndarray, n: int, seed: int = 0) -> list[tuple[int, int, int]]:
    """``n`` pairs (m, partner, class id) that share a class: m in order, the class uniform
    among m's shareable ones, the partner uniform among the other images holding it."""
    index = PartnerIndex(labels)
    rng = np.random.default_rng(seed)
    out = []
    for m in np.flatnonzero(index.shareable.any(1)).tolist():
        classes = np.flatnonzero(index.shareable[m])
        col = int(classes[rng.integers(classes.size)])
        out.append((m, index.other_member(col, m, int(rng.integers(index.class_counts[col] - 1))), col + 1))
        if len(out) == n:
            break
    return out


def collect(model, dataset, pairs: Sequence[tuple[int, int, int]], parts=None, band: int = 1) -> dict[str, float]:
    """Mean of ``pair_diagnostics`` over ``pairs`` (m, n, class id) of a ``VOCDataset`` with
    masks (normalised images); ``parts``: a function name -> part map (H, W) or None.
    NaNs (a region without cells) are left out of each mean; ``pairs`` counts the pairs."""
    rows = []
    for m, n, c in pairs:
        a, b = dataset[m], dataset[n]
        part = torch.as_tensor(parts(a["name"])) if parts is not None else None
        x_m, x_n = (item["image"][None].as_subclass(torch.Tensor) for item in (a, b))
        mask_m, mask_n = (item["mask"].as_subclass(torch.Tensor) for item in (a, b))
        rows.append(pair_diagnostics(model, x_m, x_n, mask_m, mask_n, c, part, band))
    keys = rows[0].keys() if rows else []
    out = {k: float(np.nanmean([r[k] for r in rows])) for k in keys}
    out["pairs"] = len(rows)
    return out


def part_reader(data_root):
    """name -> the benchmark's part map (H, W) uint8, or None when the dataset has none."""
    folder = Path(data_root) / PART_DIR
    if not folder.is_dir():
        return None
    return lambda name: np.array(Image.open(folder / f"{name}.png"))


def maps_part_coverage(data_root, maps_dir, names, thresholds=(0.5,)) -> dict[str, list[float]]:
    """The benchmark's calibration measures of saved maps (``wsss.data.synth.part_coverage``):
    per threshold, the recall of the discriminative part and of the body, and the shares of
    the above-threshold map on the object and on context, over the images ``names`` of
    MAPS (NAME.npz)."""
    parts, root = part_reader(data_root), Path(data_root)
    if parts is None:
        raise FileNotFoundError(f"{root} has no part maps: the calibration needs the embedded benchmark")
    counts = 0
    for name in names:
        maps, classes = load_maps(maps_path(maps_dir, name))
        mask = np.array(Image.open(root / "SegmentationClass" / f"{name}.png"))
        full = np.zeros((int(max(classes.max(initial=0), mask.max(initial=0))), *maps.shape[1:]), np.float32)
        full[classes - 1] = maps
        counts = counts + part_coverage_counts(full, np.where(mask == 255, 0, mask), parts(name), thresholds)
    return part_coverage(counts, thresholds)


def summary_table(stats: dict[str, float]) -> str:
    """The diagnostics as a short markdown table (shares and masses in %)."""
    lines = ["| measure | value |", "|---|---|"]
    for key, value in stats.items():
        pct = not key.startswith(("phi", "pairs"))
        lines.append(f"| {key} | {100 * value:.1f} % |" if pct else f"| {key} | {value:.3g} |")
    return "\n".join(lines)
