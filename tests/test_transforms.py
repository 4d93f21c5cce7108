"""wsss.data.transforms: joint geometry on image and mask, 255 padding, dtypes."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torchvision import tv_tensors
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as F

from wsss.data.transforms import MEAN, STD, RandomScale, denormalize, eval_transforms, train_transforms

GREY_STEP = 50  # image value = class * GREY_STEP, so the image "is" its mask


def layout_mask(size: int = 32) -> torch.Tensor:
    """An asymmetric layout (left/right and top/bottom differ) of classes 1..4."""
    m = torch.ones(size, size, dtype=torch.int64)
    h = size // 2
    m[:h, h:] = 2
    m[h:, h:] = 3
    m[4:12, 4:12] = 4
    return m


def image_of(mask: torch.Tensor) -> tv_tensors.Image:
    grey = (mask.clamp(max=4) * GREY_STEP).to(torch.uint8)
    return tv_tensors.Image(grey.expand(3, -1, -1).clone())


def decode(image: torch.Tensor) -> torch.Tensor:
    """Class read back from a transformed image (0 where the crop padded it)."""
    grey = torch.from_numpy(denormalize(image)[..., 0]).float()
    return (grey / GREY_STEP).round().long()


def interior(mask: torch.Tensor) -> torch.Tensor:
    """Labelled pixels whose 3x3 neighbourhood holds one label (away from any edge, where
    bilinear image resizing and nearest mask resizing legitimately differ)."""
    m = mask.float()[None, None]
    hi = torch.nn.functional.max_pool2d(m, 3, 1, 1)
    lo = -torch.nn.functional.max_pool2d(-m, 3, 1, 1)
    return ((hi == lo) & (m != 255))[0, 0]


def agreement(image: torch.Tensor, mask: torch.Tensor) -> float:
    valid = interior(mask)
    assert valid.sum() > 0
    return (decode(image)[valid] == mask[valid]).float().mean().item()


def test_output_types_dtypes_and_shapes():
    mask = tv_tensors.Mask(layout_mask())
    image, out_mask = train_transforms(crop=24)(image_of(mask), mask)
    assert isinstance(image, tv_tensors.Image) and isinstance(out_mask, tv_tensors.Mask)
    assert image.dtype == torch.float32 and image.shape == (3, 24, 24)
    assert out_mask.dtype == torch.int64 and out_mask.shape == (24, 24)
    image = train_transforms(crop=(20, 28))(image_of(mask))  # image alone works too
    assert image.shape == (3, 20, 28)


def test_crop_padding_fills_mask_with_255_and_image_with_black():
    mask = tv_tensors.Mask(torch.full((10, 12), 3, dtype=torch.int64))
    torch.manual_seed(0)
    image, out = train_transforms(crop=20, scale=None, flip=False, jitter=0)(image_of(mask), mask)
    assert out.shape == (20, 20)
    assert set(out.unique().tolist()) == {3, 255}
    assert (out == 3).sum().item() == 10 * 12
    assert torch.equal(decode(image) == 0, out == 255)  # the padded pixels coincide


@pytest.mark.parametrize("seed", range(12))
def test_image_and_mask_are_transformed_jointly(seed):
    mask = tv_tensors.Mask(layout_mask())
    torch.manual_seed(seed)
    image, out = train_transforms(crop=28, scale=(0.6, 1.4), jitter=0)(image_of(mask), mask)
    assert agreement(image, out) > 0.98
    # The check can fail: the same output with only the image flipped disagrees.
    assert agreement(F.horizontal_flip(image), out) < 0.5


def test_flip_happens_and_is_joint():
    mask = tv_tensors.Mask(layout_mask())
    flipped = 0
    for seed in range(16):
        torch.manual_seed(seed)
        image, out = train_transforms(crop=None, scale=None, flip=True, jitter=0)(image_of(mask), mask)
        assert agreement(image, out) == 1.0
        if torch.equal(out, mask.flip(-1)):
            flipped += 1
        else:
            assert torch.equal(out, mask)
    assert 0 < flipped < 16


def test_random_scale_matches_resize_with_the_same_draw():
    mask = tv_tensors.Mask(layout_mask())
    mask[0, 0] = 255
    lo, hi = 0.5, 1.5
    sizes = set()
    for seed in range(8):
        torch.manual_seed(seed)
        f = lo + (hi - lo) * torch.rand(()).item()
        size = [round(32 * f), round(32 * f)]
        torch.manual_seed(seed)
        image, out = RandomScale((lo, hi))(image_of(mask), mask)
        assert list(out.shape) == size and list(image.shape[-2:]) == size
        assert torch.equal(out, F.resize(mask, size, interpolation=InterpolationMode.NEAREST))
        assert set(out.unique().tolist()) <= {1, 2, 3, 4, 255}  # nearest: no new labels
        sizes.add(size[0])
    assert len(sizes) > 4
    with pytest.raises(ValueError):
        RandomScale((1.3, 0.7))


def test_colour_jitter_leaves_the_mask_alone():
    mask = tv_tensors.Mask(layout_mask())
    outs = []
    for jitter in (0.0, 0.9):
        torch.manual_seed(3)
        image, out = train_transforms(crop=24, jitter=jitter)(image_of(mask), mask)
        outs.append((image, out))
    assert torch.equal(outs[0][1], outs[1][1])
    assert not torch.allclose(outs[0][0], outs[1][0])


def test_eval_transforms_normalise_and_resize():
    torch.manual_seed(0)
    raw = torch.randint(0, 256, (3, 20, 30), dtype=torch.uint8)
    image = eval_transforms()(tv_tensors.Image(raw))
    expected = (raw.float() / 255 - torch.tensor(MEAN).view(3, 1, 1)) / torch.tensor(STD).view(3, 1, 1)
    assert image.shape == (3, 20, 30) and torch.allclose(image, expected, atol=1e-5)
    mask = tv_tensors.Mask(layout_mask())
    mask[:2] = 255
    image, out = eval_transforms(16)(image_of(mask), mask)
    assert image.shape == (3, 16, 16) and out.shape == (16, 16) and out.dtype == torch.int64
    assert set(out.unique().tolist()) <= {1, 2, 3, 4, 255}
    assert eval_transforms((8, 12))(image_of(mask)).shape == (3, 8, 12)


def test_denormalize_inverts_normalisation():
    raw = torch.randint(0, 256, (3, 9, 7), dtype=torch.uint8)
    back = denormalize(eval_transforms()(tv_tensors.Image(raw)))
    assert back.dtype == np.uint8 and back.shape == (9, 7, 3)
    assert np.abs(back.astype(int) - raw.permute(1, 2, 0).numpy().astype(int)).max() <= 1
    assert np.array_equal(denormalize(raw), raw.permute(1, 2, 0).numpy())
    with pytest.raises(ValueError):
        denormalize(torch.zeros(1, 3, 4, 4))
