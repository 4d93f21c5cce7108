"""Joint image/mask transforms on torchvision.transforms.v2 and tv_tensors.

Call a transform as ``t(image, mask)`` with a ``tv_tensors.Image`` (uint8, (3, H, W)) and a
``tv_tensors.Mask`` (int64, (H, W)): geometry (scale, crop, flip) is applied to both with
the same random draw, masks are resized with nearest interpolation and padded with 255
(ignore), and colour jitter, dtype conversion and normalisation touch the image only.
``t(image)`` alone works too. The scale range and crop follow the reference training
(METHOD.md sec. 1 and sec. 4).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torchvision import tv_tensors
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F

from wsss.classes import IGNORE_INDEX
from wsss.data.pairs import _scaled_size  # the batch views' rounding, for the same view sizes

MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)
PAD_FILL = {tv_tensors.Image: 0, tv_tensors.Mask: IGNORE_INDEX}


class RandomScale(v2.Transform):
    """Rescale image and mask by one factor drawn uniformly from ``scale`` (aspect kept)."""

    def __init__(self, scale: tuple[float, float] = (0.7, 1.3)):
        super().__init__()
        lo, hi = scale
        if not 0 < lo <= hi:
            raise ValueError(f"scale must be (low, high) with 0 < low <= high, got {scale}")
        self.scale = (float(lo), float(hi))

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        h, w = v2.query_size(flat_inputs)
        lo, hi = self.scale
        f = lo + (hi - lo) * torch.rand(()).item()
        return {"size": [max(1, round(h * f)), max(1, round(w * f))]}

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        # F.resize dispatches on the tv_tensor type: bilinear for images, nearest for masks.
        return self._call_kernel(F.resize, inpt, size=params["size"], antialias=True)


def _to_normalized_float() -> list[v2.Transform]:
    return [
        v2.ToDtype({tv_tensors.Image: torch.float32, tv_tensors.Mask: torch.int64, "others": None},
                   scale=True),
        v2.Normalize(MEAN, STD),
    ]


def _as_size(size: int | tuple[int, int]) -> list[int]:
    return [size, size] if isinstance(size, int) else list(size)


def train_transforms(crop: int | tuple[int, int] | None = 321, scale: tuple[float, float] | None = (0.7, 1.3),
                     flip: bool = True, jitter: float = 0.3, hue: float = 0.0,
                     squash: int | tuple[int, int] | None = None) -> v2.Compose:
    """Random scale, random crop (padded: image 0, mask 255), flip, colour jitter, normalise.

    ``crop=None`` keeps the scaled size; ``scale=None``, ``flip=False`` or ``jitter=0``
    switch the corresponding step off. ``hue``: the jitter's hue range (0 = none).
    ``squash``: first resize to this size, aspect ratio not kept (the reference's training
    input, Classifier/utils/LoadData.py:149-151 with its Resize to (size, size)).
    """
    steps: list[v2.Transform] = []
    if squash is not None:
        steps.append(v2.Resize(_as_size(squash), antialias=True))
    if scale is not None:
        steps.append(RandomScale(scale))
    if crop is not None:
        steps.append(v2.RandomCrop(_as_size(crop), pad_if_needed=True, fill=PAD_FILL))
    if flip:
        steps.append(v2.RandomHorizontalFlip(0.5))
    if jitter or hue:
        steps.append(v2.ColorJitter(brightness=jitter, contrast=jitter, saturation=jitter, hue=hue))
    return v2.Compose(steps + _to_normalized_float())


def source_view_transforms(size: int, down: float = 0.75, up: float = 2.0) -> dict[str, v2.Compose]:
    """The reference's self-pair views, made from the stored image (no jitter): flip of the
    image squashed to size x size, and the image squashed to down x and up x that size
    (Classifier/utils/LoadData.py:161-173). Keys match ``wsss.data.pairs.self_pair_views``."""
    def squash(s: int, flip: bool = False) -> v2.Compose:
        return v2.Compose([v2.Resize([s, s], antialias=True)] + ([v2.RandomHorizontalFlip(1.0)] if flip else [])
                          + _to_normalized_float())
    return {"flip": squash(size, flip=True), "down": squash(_scaled_size(size, down)),
            "up": squash(_scaled_size(size, up))}


def eval_transforms(size: int | tuple[int, int] | None = None) -> v2.Compose:
    """Resize to ``size`` (an int gives a square; masks nearest) when given, then normalise."""
    steps = [v2.Resize(_as_size(size), antialias=True)] if size is not None else []
    return v2.Compose(steps + _to_normalized_float())


def denormalize(img: torch.Tensor) -> np.ndarray:
    """A normalised (3, H, W) image tensor back to (H, W, 3) uint8 for plotting.

    A uint8 tensor is taken as already unnormalised.
    """
    if img.ndim != 3 or img.shape[0] != 3:
        raise ValueError(f"denormalize expects a (3, H, W) tensor, got shape {tuple(img.shape)}")
    x = img.detach().cpu().as_subclass(torch.Tensor)
    if x.dtype != torch.uint8:
        mean = torch.tensor(MEAN).view(3, 1, 1)
        std = torch.tensor(STD).view(3, 1, 1)
        x = (x.float() * std + mean).clamp(0, 1).mul(255).round().to(torch.uint8)
    return x.permute(1, 2, 0).contiguous().numpy()
