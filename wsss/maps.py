"""Object localization maps with cross-image context (METHOD.md section 2); the maps stage
(``wsss.stages.make_maps``) runs them over a split.

For each ground-truth class c of an image I_m the map is an average of up to three kinds
of class maps, chosen by ``combine``:

- ``"cam"``: the single-image basic map S_m[c] = phi_0(F_m)[c] (plain CAM);
- ``"coatt"``: the cross-image map S_m^{m∩n}[c], one per partner n among k images that
  also contain c (reference: k = 3), averaged over the partners;
- ``"self"``: co-attention maps of self-pairs: I_m paired with its transformed copy
  T(I_m) for T in identity / flip / 0.75x / 2x, ordered as in training, (I_m, T(I_m))
  (``wsss.data.pairs.self_pair_views``); the map is T(I_m)'s, the n side of the pair
  (Classifier/scripts/test.py:153-196), taken back to I_m's frame (the flipped map is
  flipped back, every map is resized to one size). The order matters: with a learned,
  non-symmetric W_P, the pair (T(I_m), I_m) would score T(I_m) through W_P^T.

``aggregate="mean"`` (ours): every single map is rectified (ReLU) and divided by its maximum *before* averaging
(an all-zero map stays zero), then resized to the image (bilinear). A kind's maps are
averaged first (over partners, self-pair transforms and ``scales``), then the kinds are
averaged with equal weight, and the result is divided by its maximum once more, so that
every saved map lies in [0, 1] with a peak of exactly 1 (unless it is all zero), as the
pseudo-mask rules of METHOD.md section 3 (``wsss.pseudo``) expect. Classes absent from
the image-level label l_m get no map.

A class that no other image of the split contains has no partner: its cross-image map
is left out of the average (the remaining kinds decide), and when "coatt" is the only
kind, the self-pair maps stand in (I_m is then the only image known to hold c). Such
classes are counted and logged once.

Files: RUN/maps/NAME.npz with ``maps`` float16 (n, H, W) at the native image size and
``classes`` int16 (n,) (label ids 1..K), written atomically; RUN/maps/settings.json
records what the maps depend on, so that a re-run skips finished images only when they
were made the same way (``overwrite=True`` recomputes everything).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from wsss.data.pairs import self_pair_views
from wsss.files import atomic_path

KINDS = ("cam", "coatt", "self")
AGGREGATES = ("mean", "reference")
SELF_TRANSFORMS = ("identity", "flip", "down", "up")


def parse_combine(combine: str | Sequence[str]) -> tuple[str, ...]:
    """Normalise ``combine`` to a tuple of kinds in canonical order.

    Accepts a kind, "all", or kinds joined by "+" or "," (e.g. "cam+self"), or a sequence
    of those (a config field holds ``combine: cam+coatt`` as the 1-tuple ("cam+coatt",)).
    """
    words = [w.strip() for p in ([combine] if isinstance(combine, str) else combine)
             for w in str(p).replace("+", ",").split(",")]
    chosen = set(KINDS) if words == ["all"] else {w for w in words if w}
    unknown = sorted(chosen - set(KINDS))
    if unknown or not chosen:
        raise ValueError(f"combine={combine!r}: choose one or more of {list(KINDS)} (or 'all'); "
                         f"{'unknown: ' + str(unknown) if unknown else 'nothing chosen'}")
    return tuple(k for k in KINDS if k in chosen)


def check_self_transforms(transforms: Sequence[str]) -> tuple[str, ...]:
    transforms = tuple(transforms)
    unknown = sorted(set(transforms) - set(SELF_TRANSFORMS))
    if unknown or not transforms:
        raise ValueError(f"self_transforms={transforms!r}: choose one or more of {list(SELF_TRANSFORMS)}")
    return transforms


def normalise_maps(maps: torch.Tensor) -> torch.Tensor:
    """ReLU, then divide each map (..., h, w) by its maximum; an all-zero map stays zero."""
    maps = maps.float().clamp_min(0)
    peak = maps.amax(dim=(-2, -1), keepdim=True)
    return maps / torch.where(peak > 0, peak, torch.ones_like(peak))


def _resize(maps: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(n, h, w) -> (n, H, W), bilinear."""
    if tuple(maps.shape[-2:]) == tuple(size):
        return maps
    return F.interpolate(maps[None], size=size, mode="bilinear", align_corners=False)[0]


def _rescale(x: torch.Tensor, scale: float) -> torch.Tensor:
    if scale == 1.0:
        return x
    h, w = x.shape[-2:]
    size = (max(1, round(h * scale)), max(1, round(w * scale)))
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False)


class _Accumulator:
    """Per-kind sums and counts of normalised maps, (n, H, W) each."""

    def __init__(self, n: int, size: tuple[int, int], device: torch.device):
        self.n, self.size, self.device = n, size, device
        self.sums: dict[str, torch.Tensor] = {}
        self.counts: dict[str, torch.Tensor] = {}

    def add(self, kind: str, rows: torch.Tensor, raw_maps: torch.Tensor) -> None:
        """Add raw class maps (len(rows), h, w) for the given class rows."""
        if kind not in self.sums:
            self.sums[kind] = torch.zeros(self.n, *self.size, device=self.device)
            self.counts[kind] = torch.zeros(self.n, device=self.device)
        maps = _resize(normalise_maps(raw_maps), self.size)
        rows = rows.to(self.device)
        self.sums[kind].index_add_(0, rows, maps.to(self.device))
        self.counts[kind].index_add_(0, rows, torch.ones(len(rows), device=self.device))

    def mean(self, kind: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean maps (n, H, W), present (n,) bool) of one kind that has maps."""
        counts = self.counts[kind]
        return self.sums[kind] / counts.clamp_min(1).view(-1, 1, 1), counts > 0

    def combine(self, kinds: Sequence[str], fallback: str | None) -> torch.Tensor:
        """Equal-weight average over the kinds present for each class, then max-normalised;
        a class with none of them takes the ``fallback`` kind (kinds without maps add nothing)."""
        total = torch.zeros(self.n, *self.size, device=self.device)
        used = torch.zeros(self.n, device=self.device)
        for kind in [k for k in kinds if k in self.sums]:
            mean, present = self.mean(kind)
            total += mean * present.view(-1, 1, 1)
            used += present.float()
        if fallback in self.sums:
            mean, present = self.mean(fallback)
            take = (used == 0) & present
            total[take] = mean[take]
            used[take] = 1
        return normalise_maps(total / used.clamp_min(1).view(-1, 1, 1))


def _as_batch(image: torch.Tensor, device: torch.device) -> torch.Tensor:
    image = torch.as_tensor(image).as_subclass(torch.Tensor)
    if image.ndim == 3:
        image = image[None]
    if image.ndim != 4 or image.shape[0] != 1 or image.shape[1] != 3:
        raise ValueError(f"expected one normalised image (1, 3, H, W) or (3, H, W), got shape {tuple(image.shape)}")
    if not image.is_floating_point():
        raise ValueError("images must be normalised float tensors (wsss.data.transforms.eval_transforms), got "
                         f"{image.dtype}")
    return image.to(device)


def _check_model(model) -> None:
    missing = [a for a in ("features", "phi0", "phi", "coatt") if not hasattr(model, a)]
    if missing:
        raise TypeError(f"{type(model).__name__} lacks {missing}: localization_maps needs a "
                        f"wsss.models.CoAttentionClassifier (unwrap DDP/compiled models first)")


def coatt_map(model, f_m: torch.Tensor, f_n: torch.Tensor, side: str = "m") -> torch.Tensor:
    """S_m^{m∩n} = phi(F_m^{m∩n}) (B, K, h, w) from backbone features: what
    ``model.coatt_cam(x_m, x_n)`` computes, with the features computed once by the caller.
    ``side="n"``: the partner's map S_n^{m∩n} = phi(F_n^{m∩n}) instead (on f_n's grid)."""
    co_m, co_n = model.coatt(f_m, f_n)
    return model.phi(co_m if side == "m" else co_n)


def reference_aggregate(maps: Sequence[torch.Tensor]) -> torch.Tensor:
    """The reference's combination of raw maps (each (n, h, w), one row per class;
    Classifier/scripts/test.py:71-83): the first map rectified and divided by its maximum;
    each other map added, rectified and normalised, only where the sigmoid of its raw mean
    exceeds 0.1 (decided per class row); the sum divided by len(maps)."""
    total = normalise_maps(maps[0])
    for raw in maps[1:]:
        keep = torch.sigmoid(raw.float().mean(dim=(-2, -1))) > 0.1
        total = total + normalise_maps(raw) * keep[:, None, None]
    return total / len(maps)


def _minmax(maps: torch.Tensor) -> torch.Tensor:
    lo = maps.amin(dim=(-2, -1), keepdim=True)
    span = maps.amax(dim=(-2, -1), keepdim=True) - lo
    return (maps - lo) / torch.where(span > 0, span, torch.ones_like(span))


def _reference_maps(model, x: torch.Tensor, channels: torch.Tensor, unique: dict, size, batch: int) -> torch.Tensor:
    """``aggregate="reference"`` (module docstring): (len(channels), *size) in [0, 1]."""
    views = self_pair_views(x)
    partners = list(unique.values())
    f_x, f_flip, f_down, f_up, *f_partners = _features(
        model, [x, views["flip"], views["down"], views["up"]] + [p for p, _ in partners], batch)
    grid = f_x.shape[-2:]

    def bicubic(m):
        return F.interpolate(m, size=grid, mode="bicubic", align_corners=False)

    maps = [coatt_map(model, f_x, f_flip)[0, channels],
            coatt_map(model, f_x, f_flip, "n").flip(-1)[0, channels],
            bicubic(coatt_map(model, f_x, f_down, "n"))[0, channels],
            bicubic(coatt_map(model, f_x, f_up, "n"))[0, channels]]
    n = len(channels)
    sums, counts = torch.zeros(n, *grid, device=x.device), torch.zeros(n, device=x.device)
    for f_n, (_, rows) in zip(f_partners, partners):
        rows = torch.tensor(rows, device=x.device)
        sums.index_add_(0, rows, coatt_map(model, f_x, f_n)[0, channels[rows]].float())
        counts.index_add_(0, rows, torch.ones(len(rows), device=x.device))
    if bool((counts > 0).all()):
        maps.append(sums / counts.view(-1, 1, 1))
    combined = reference_aggregate(maps)
    out = F.interpolate(combined[None], size=size, mode="bicubic", align_corners=False)[0]
    return _minmax(out.clamp_min(0))


def _features(model, images: list[torch.Tensor], batch: int) -> list[torch.Tensor]:
    """Backbone features of each (1, 3, h, w) image, at most ``batch`` images per call
    (``model.features`` batches the images of one size together)."""
    feats: list[torch.Tensor] = []
    for start in range(0, len(images), batch):
        feats += model.features(images[start:start + batch])
    return feats


@torch.no_grad()
def localization_maps(model, image: torch.Tensor, classes: Sequence[int],
                      partner_images: Mapping[int, Sequence[torch.Tensor]] | None = None,
                      combine: str | Sequence[str] = KINDS, scales: Sequence[float] = (1.0,), *,
                      out_size: tuple[int, int] | None = None, self_transforms: Sequence[str] = SELF_TRANSFORMS,
                      batch: int = 8, aggregate: str = "mean") -> torch.Tensor:
    """Localization maps (len(classes), H, W) float32 in [0, 1] of one image (METHOD.md sec. 2).

    ``model``: a CoAttentionClassifier in eval mode. ``image``: the normalised image
    (1, 3, H, W). ``classes``: the image's label ids (1..K); row i of the result is the map
    of ``classes[i]``. ``partner_images``: class id -> partner images (each (3, h, w) or
    (1, 3, h, w), normalised) that contain the class; needed only for "coatt"; the same
    tensor listed for several classes is run through the backbone once. ``combine``: the
    kinds to average (module docstring). ``scales``: the image and its partners are
    rescaled by each factor and every map counts once. ``out_size``: (H, W) of the result,
    default the image's size. ``batch``: images per backbone call. Each backbone pass is
    computed once and shared by every map that needs it: the maps equal those of
    ``model.cam`` and ``model.coatt_cam`` (tests/test_make_maps.py checks this). The result
    lives on the image's device. ``aggregate``: "mean" or "reference" (module docstring;
    "reference" ignores ``combine``, ``scales`` and ``self_transforms``).
    """
    if aggregate not in AGGREGATES:
        raise ValueError(f"aggregate={aggregate!r}: choose one of {AGGREGATES}")
    kinds = parse_combine(combine)
    transforms = check_self_transforms(self_transforms)
    _check_model(model)
    if not scales:
        raise ValueError("scales is empty: give at least one factor, e.g. (1.0,)")
    if batch < 1:
        raise ValueError(f"batch must be >= 1, got {batch}")
    device = next(model.parameters()).device
    out_device = torch.as_tensor(image).device
    x0 = _as_batch(image, device)
    size = tuple(int(s) for s in (out_size or x0.shape[-2:]))
    classes = [int(c) for c in classes]
    num_classes = getattr(model, "num_classes", None)
    bad = [c for c in classes if c < 1 or (num_classes is not None and c > num_classes)]
    if bad:
        raise ValueError(f"class ids {bad} outside 1..{num_classes} (label ids; 0 is background)")
    if len(set(classes)) != len(classes):
        raise ValueError(f"classes has repeated ids: {classes}")
    if not classes:
        return torch.zeros(0, *size, device=out_device)

    channels = torch.tensor([c - 1 for c in classes], dtype=torch.long, device=device)
    # unique partner tensors, and which class rows use each
    partner_images = partner_images or {}
    unique: dict[int, tuple[torch.Tensor, list[int]]] = {}
    if "coatt" in kinds or aggregate == "reference":
        for row, c in enumerate(classes):
            for p in partner_images.get(c, ()):
                unique.setdefault(id(p), (_as_batch(p, device), []))[1].append(row)
    if aggregate == "reference":
        return _reference_maps(model, x0, channels, unique, size, batch).to(out_device)
    has_partner = {row for _, rows in unique.values() for row in rows}
    fallback = "self" if kinds == ("coatt",) and len(has_partner) < len(classes) else None
    use_self = "self" in kinds or fallback is not None
    views = [t for t in transforms if t != "identity"] if use_self else []

    acc = _Accumulator(len(classes), size, device)
    all_rows = torch.arange(len(classes))
    for scale in scales:
        x = _rescale(x0, float(scale))
        view_images = self_pair_views(x) if views else {}
        partners = [(_rescale(p, float(scale)), rows) for p, rows in unique.values()]
        feats = _features(model, [x] + [view_images[t] for t in views] + [p for p, _ in partners], batch)
        f_x, f_views, f_partners = feats[0], dict(zip(views, feats[1:1 + len(views)])), feats[1 + len(views):]
        if "cam" in kinds:
            acc.add("cam", all_rows, model.phi0(f_x)[0, channels])
        if use_self:
            for t in transforms:  # T(x)'s map in the training pair (x, T(x)), back in x's frame
                maps = coatt_map(model, f_x, f_views.get(t, f_x), "n")[0, channels]
                acc.add("self", all_rows, maps.flip(-1) if t == "flip" else maps)
        for f_n, (_, rows) in zip(f_partners, partners):
            maps = coatt_map(model, f_x, f_n)[0]
            acc.add("coatt", torch.tensor(rows), maps[channels[rows]])
    return acc.combine(kinds, fallback).to(out_device)


# --------------------------------------------------------------------------- files

def maps_path(maps_dir: str | Path, name: str) -> Path:
    return Path(maps_dir) / f"{name}.npz"


def save_maps(path: str | Path, maps, classes) -> None:
    """Write maps (n, H, W) as float16 and classes (n,) as int16 to ``path``, atomically."""
    maps = np.asarray(maps, dtype=np.float16)
    classes = np.asarray(classes, dtype=np.int16).reshape(-1)
    if maps.ndim != 3 or maps.shape[0] != classes.size:
        raise ValueError(f"save_maps({path}): maps {maps.shape} must be (n, H, W) with n = {classes.size} classes")
    with atomic_path(path) as tmp, open(tmp, "wb") as f:  # a file object: np.savez adds no ".npz" suffix
        np.savez(f, maps=maps, classes=classes)


def load_maps(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """(maps float32 (n, H, W), classes int64 (n,)) from a file written by the maps stage."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"localization maps {path} do not exist: run the maps stage "
                                f"(wsss.stages.make_maps.run) for this image's split first")
    try:
        with np.load(path, allow_pickle=False) as z:
            maps, classes = z["maps"].astype(np.float32), z["classes"].astype(np.int64)
    except (OSError, KeyError, ValueError) as err:
        raise ValueError(f"cannot read localization maps {path} ({err}): delete the file and re-run the maps "
                         f"stage") from None
    if maps.ndim != 3 or maps.shape[0] != classes.size:
        raise ValueError(f"{path}: maps {maps.shape} do not match {classes.size} classes; delete it and re-run")
    return maps, classes
