"""Image pairs for the co-attention classifier (METHOD.md sec 1 and 2).

Training looks at pairs (I_m, I_n): with probability ``p_common`` the partner I_n shares
at least one image-level label with I_m, otherwise it is any other image drawn
uniformly (METHOD.md sec 1). Inference gathers, for each class c of I_m, k other images
that also contain c (METHOD.md sec 2). Both draw from a :class:`PartnerIndex`, built once
from the (N, K) multi-hot label matrix, so that one draw costs O(K + log N), not O(N).

A common partner is drawn in two steps: a class c uniformly among m's classes that some
other image also carries, then an image uniformly among the other images holding c.
An image that shares many classes with m is therefore proportionally more likely.

Label columns are 0-based foreground classes (column c is class c + 1 in the VOC masks).
"""

from __future__ import annotations

import contextlib
import logging
import operator
import weakref

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

log = logging.getLogger(__name__)


def _check_labels(labels) -> np.ndarray:
    """Validate an (N, K) 0/1 label matrix and return it as a bool array."""
    arr = np.asarray(labels)
    if arr.ndim != 2:
        raise ValueError(f"labels must be an (N, K) multi-hot matrix, got shape {arr.shape}")
    if arr.size and not np.isin(arr, (0, 1)).all():
        raise ValueError("labels must hold only 0 and 1 (multi-hot image-level labels)")
    return arr.astype(bool)


def _check_p_common(p_common: float) -> float:
    p = float(p_common)
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"p_common must lie in [0, 1], got {p_common}")
    return p


class PartnerIndex:
    """Per-class image lists of a label matrix, precomputed once for fast partner draws.

    Attributes: ``labels`` (N, K) bool, ``members[c]`` the sorted indices of the images
    holding class c, ``shareable`` (N, K) bool: class c of image m is held by another image
    too, ``num_isolated``: images that share no class with any other image (a common
    partner is impossible for them), ``num_fallbacks``: how many common-partner draws fell
    back to a uniform partner. The counter and the log-once flag live in this object, so
    each process (DataLoader worker) that holds a copy counts and warns on its own.
    """

    def __init__(self, labels):
        self.labels = _check_labels(labels)
        self.num_images, self.num_classes = self.labels.shape
        self.members = [np.flatnonzero(self.labels[:, c]) for c in range(self.num_classes)]
        self.class_counts = self.labels.sum(0)
        self.shareable = self.labels & (self.class_counts >= 2)
        self.num_isolated = int((~self.shareable.any(1)).sum())
        self.num_fallbacks = 0
        self._warned = False

    def __len__(self) -> int:
        return self.num_images

    def check_image(self, m, pair: bool = True) -> int:
        """``m`` as an int; IndexError outside 0..N-1, and (with ``pair``) ValueError when N < 2."""
        m = operator.index(m)
        if not 0 <= m < self.num_images:
            raise IndexError(f"image index {m} outside 0..{self.num_images - 1}")
        if pair and self.num_images < 2:
            raise ValueError("an image pair needs at least 2 images, the label matrix has 1")
        return m

    def uniform_partner(self, m: int, rng: np.random.Generator) -> int:
        """Any image n != m, uniformly."""
        r = int(rng.integers(self.num_images - 1))
        return r + (r >= m)

    def common_partner(self, m: int, rng: np.random.Generator, include_self: bool = False) -> int | None:
        """An image n != m sharing a class with m (class first, then image); None if none.
        ``include_self``: the reference's draw (Classifier/utils/LoadData.py:225-226): a
        class uniformly among all of m's, then any image holding it, m included."""
        if include_self:
            classes = np.flatnonzero(self.labels[m])
            c = classes[rng.integers(classes.size)]
            return int(self.members[c][rng.integers(self.class_counts[c])])
        classes = np.flatnonzero(self.shareable[m])
        if classes.size == 0:
            return None
        c = classes[rng.integers(classes.size)]
        return self.other_member(c, m, int(rng.integers(self.class_counts[c] - 1)))

    def other_member(self, c: int, m: int, j: int) -> int:
        """The j-th image holding class c once m is left out of the list."""
        members = self.members[c]
        pos_m = int(np.searchsorted(members, m))
        skip = pos_m < members.size and members[pos_m] == m
        return int(members[j + (skip and j >= pos_m)])

    def record_fallback(self, m: int) -> None:
        self.num_fallbacks += 1
        if self._warned:
            return
        self._warned = True
        classes = np.flatnonzero(self.labels[m]).tolist()
        log.warning(
            "image %d (label columns %s) shares no class with any other image, so it gets a "
            "uniform random partner instead of a common one; %d of %d images are like this. "
            "Logged once; later fallbacks are only counted (num_fallbacks).",
            m, classes, self.num_isolated, self.num_images,
        )


_cache: tuple[weakref.ref, PartnerIndex] | None = None


def as_partner_index(labels) -> PartnerIndex:
    """``labels`` itself if it is a PartnerIndex, else the index of that array.

    The index of the last array passed is kept (weakly), so repeated calls with the same
    array do not rebuild it; the array is taken as read-only: after changing it in place,
    build a fresh ``PartnerIndex`` and pass that.
    """
    global _cache
    if isinstance(labels, PartnerIndex):
        return labels
    if _cache is not None and _cache[0]() is labels:
        return _cache[1]
    index = PartnerIndex(labels)
    with contextlib.suppress(TypeError):  # lists and other objects without weak references: no caching
        _cache = (weakref.ref(labels), index)
    return index


def sample_partner(labels, m: int, p_common: float, rng: np.random.Generator,
                   include_self: bool = False) -> int:
    """Partner n != m for image m (METHOD.md sec 1); n = m is possible for a common partner
    with ``include_self`` (the reference's draw, ``PartnerIndex.common_partner``).

    With probability ``p_common`` n shares at least one label with m, otherwise n is
    uniform over the other images. When m shares no class with any other image the draw
    falls back to a uniform partner: a warning is logged once per index and every
    fallback is counted in ``PartnerIndex.num_fallbacks``. ``labels``: an (N, K) 0/1 array
    or a prebuilt :class:`PartnerIndex`.
    """
    index = as_partner_index(labels)
    m = index.check_image(m)
    p_common = _check_p_common(p_common)
    if rng.random() < p_common:
        n = index.common_partner(m, rng, include_self and index.labels[m].any())
        if n is not None:
            return n
        index.record_fallback(m)
    return index.uniform_partner(m, rng)


def partners_for_class(labels, m: int, c: int, k: int, rng: np.random.Generator,
                       replace: bool = False) -> list[int]:
    """k images other than m that contain class column c (METHOD.md sec 2).

    Drawn without replacement when at least k exist; with fewer, every one of them is used
    before any repeats (a shuffled list, cycled to length k); none gives ``[]``.
    ``replace``: the reference's draw instead (Classifier/utils/LoadData.py:96): k images
    holding c drawn with replacement, m itself included (never empty: m holds c).
    """
    index = as_partner_index(labels)
    m = index.check_image(m, pair=False)
    if not 0 <= c < index.num_classes:
        raise ValueError(f"class column {c} outside 0..{index.num_classes - 1}")
    if k < 0:
        raise ValueError(f"k must be >= 0, got {k}")
    members = index.members[c]
    if replace and k > 0 and index.labels[m, c]:
        return [int(n) for n in rng.choice(members, size=k, replace=True)]
    candidates = members[members != m]
    if k == 0 or candidates.size == 0:
        return []
    if candidates.size >= k:
        return [int(n) for n in rng.choice(candidates, size=k, replace=False)]
    order = rng.permutation(candidates)
    return [int(order[i % order.size]) for i in range(k)]


def pair_rng(seed: int, epoch: int, i: int) -> np.random.Generator:
    """The generator behind the partner of image i in an epoch: a pure function of the
    three numbers, so the draw is the same with any number of workers and any order."""
    return np.random.default_rng([seed, epoch, i])


class PairDataset(Dataset):
    """Pairs (I_m, I_n) around any dataset with ``.labels`` (N, K) (METHOD.md sec 1).

    ``ds[i]`` is ``dict(m=base[i], n=base[partner], partner=partner)``; the partner is
    fixed by (seed, epoch, i). Call ``set_epoch(e)`` before each epoch's DataLoader
    iterator is created: workers hold copies of this object, so with
    ``persistent_workers=True`` they would keep the old epoch. Indices are plain ints, so
    ``torch.utils.data.DistributedSampler`` and any other sampler work unchanged.

    ``num_fallbacks`` counts the fallbacks drawn in this process only: DataLoader workers
    count (and log their warning once) in their own copies.
    """

    def __init__(self, base, p_common: float = 1.0, seed: int = 0, include_self: bool = False,
                 view_transforms: dict | None = None):
        if not hasattr(base, "labels"):
            raise TypeError(f"{type(base).__name__} has no .labels (N, K) array; PairDataset needs image-level labels")
        if operator.index(seed) < 0:
            raise ValueError(f"seed must be >= 0, got {seed}")
        self.base = base
        self.index = PartnerIndex(base.labels)
        if len(self.index) != len(base):
            raise ValueError(f"{type(base).__name__} has {len(base)} items but {len(self.index)} label rows")
        self.p_common = _check_p_common(p_common)
        self.seed = int(seed)
        self.epoch = 0
        self.include_self = bool(include_self)
        if view_transforms and not hasattr(base, "source_image"):
            raise TypeError(f"{type(base).__name__} has no source_image(i); view_transforms need it")
        self.view_transforms = dict(view_transforms or {})

    def __len__(self) -> int:
        return len(self.base)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = operator.index(epoch)

    @property
    def num_fallbacks(self) -> int:
        return self.index.num_fallbacks

    def partner_of(self, i: int) -> int:
        """The partner of item i in the current epoch, without loading any image."""
        i = operator.index(i)
        if i < 0:
            i += len(self)
        i = self.index.check_image(i)
        return sample_partner(self.index, i, self.p_common, pair_rng(self.seed, self.epoch, i),
                              include_self=self.include_self)

    def __getitem__(self, i):
        """``{"m", "n", "partner"}``; with ``view_transforms`` (name -> transform), m also
        carries ``"views"``: each transform applied to m's source image, not to its
        augmented copy (the reference's self-pair views, Classifier/utils/LoadData.py:239-242)."""
        n = self.partner_of(i)
        i = operator.index(i) % len(self)  # partner_of checked that i is in range
        m = self.base[i]
        if self.view_transforms:
            source = self.base.source_image(i)
            m["views"] = {name: t(source) for name, t in self.view_transforms.items()}
        return {"m": m, "n": self.base[n], "partner": n}


def _scaled_size(size: int, factor: float) -> int:
    return max(1, int(size * factor + 0.5))  # round half up, never below 1 pixel


def self_pair_views(x: torch.Tensor, down: float = 0.75, up: float = 2.0) -> dict[str, torch.Tensor]:
    """The transformed copies of I_m that it is paired with (METHOD.md sec 1).

    ``x`` (B, C, H, W) -> ``flip`` (horizontal), ``down`` (``down`` x bilinear resize) and
    ``up`` (``up`` x bilinear resize); sizes are rounded half up to whole pixels.
    """
    if x.ndim != 4:
        raise ValueError(f"self_pair_views expects a (B, C, H, W) batch, got shape {tuple(x.shape)}")
    h, w = x.shape[-2:]

    def resize(factor: float) -> torch.Tensor:
        size = (_scaled_size(h, factor), _scaled_size(w, factor))
        return F.interpolate(x, size=size, mode="bilinear", align_corners=False)

    return {"flip": x.flip(-1), "down": resize(down), "up": resize(up)}


def _sampled_pairs(index: PartnerIndex, p_common: float, num_pairs: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Pair i anchors image i mod N in epoch i // N: the pairs a PairDataset with this seed
    draws, epoch after epoch."""
    n_img = index.num_images
    ms = np.arange(num_pairs) % n_img
    ns = np.array([sample_partner(index, int(m), p_common, pair_rng(seed, i // n_img, int(m)))
                   for i, m in enumerate(ms)], dtype=np.int64)
    return ms, ns


def shared_histogram(shared: np.ndarray) -> dict[str, int]:
    """Counts of pairs sharing 0, 1, 2 and 3 or more labels."""
    counts = np.bincount(np.minimum(shared, 3), minlength=4)
    return dict(zip(("0", "1", "2", "3+"), counts.tolist()))


def pair_statistics(labels, class_names, p_common: float = 1.0, num_pairs: int | None = None, seed: int = 0) -> dict:
    """Label statistics of a split and of the pairs drawn from it (METHOD.md sec 1).

    ``num_pairs`` defaults to one pair per image (exactly the pairs of epoch 0 of a
    ``PairDataset(base, p_common, seed)``); more cycle through the images epoch by epoch.
    Returns plain Python values (JSON-ready): ``label_frequency`` (K,) images per class,
    ``cooccurrence`` (K, K) images holding both classes (diagonal = frequency),
    ``shared_hist`` counts of pairs sharing {"0", "1", "2", "3+"} labels,
    ``frac_diff_empty`` the fraction of pairs whose l_m \\ l_n is empty (no contrastive
    target), ``num_pairs``, ``num_images``, ``num_fallbacks``, ``p_common``, ``class_names``.
    """
    index = PartnerIndex(labels)
    class_names = list(class_names)
    if len(class_names) != index.num_classes:
        raise ValueError(f"{len(class_names)} class names for {index.num_classes} label columns")
    num_pairs = index.num_images if num_pairs is None else int(num_pairs)
    if num_pairs < 0:
        raise ValueError(f"num_pairs must be >= 0, got {num_pairs}")
    lab = index.labels
    ms, ns = _sampled_pairs(index, _check_p_common(p_common), num_pairs, seed)
    shared = (lab[ms] & lab[ns]).sum(1)
    diff_empty = ~(lab[ms] & ~lab[ns]).any(1)
    counts = lab.astype(np.int64)
    return {
        "class_names": class_names,
        "num_images": index.num_images,
        "num_pairs": num_pairs,
        "p_common": float(p_common),
        "label_frequency": counts.sum(0).tolist(),
        "cooccurrence": (counts.T @ counts).tolist(),
        "shared_hist": shared_histogram(shared),
        "frac_diff_empty": float(diff_empty.mean()) if num_pairs else float("nan"),
        "num_fallbacks": index.num_fallbacks,
    }


def format_statistics(stats: dict, class_names=None) -> str:
    """A text table of :func:`pair_statistics` for the command line."""
    names = list(class_names if class_names is not None else stats["class_names"])
    freq = np.asarray(stats["label_frequency"])
    co = np.asarray(stats["cooccurrence"]).copy()
    np.fill_diagonal(co, 0)
    n_img, n_pairs = stats["num_images"], stats["num_pairs"]
    width = max([len("class")] + [len(n) for n in names])
    lines = [f"{n_img} images, {len(names)} classes",
             f"{'class':<{width}}  {'images':>6}  {'% imgs':>6}  most frequent co-occurring class (images)"]
    for c, name in enumerate(names):
        top = int(co[c].argmax()) if co[c].any() else None
        partner = f"{names[top]} ({co[c, top]})" if top is not None else "-"
        lines.append(f"{name:<{width}}  {freq[c]:>6d}  {freq[c] / max(n_img, 1):>6.1%}  {partner}")
    lines.append(f"{n_pairs} sampled pairs (p_common={stats['p_common']:g}, {stats['num_fallbacks']} fallbacks)")
    for key, count in stats["shared_hist"].items():
        lines.append(f"  share {key:>2} labels: {count:>7d}  {count / max(n_pairs, 1):>6.1%}")
    lines.append(f"  l_m \\ l_n empty: {'':>7}  {stats['frac_diff_empty']:>6.1%}")
    return "\n".join(lines)


