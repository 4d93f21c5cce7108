"""wsss.crf: the dense CRF wrapper (METHOD.md sections 3-4)."""

import numpy as np
import pydensecrf.densecrf as dcrf
import pytest
from pydensecrf.utils import unary_from_softmax

from wsss.crf import CRFParams, crf_labels, dense_crf


def edge_scene(size=64, seed=0):
    """A red left half and a blue right half (mild noise), truth = 1 on the right half,
    and probabilities that are a blurred version of the truth shifted right by size/10."""
    rng = np.random.default_rng(seed)
    image = np.zeros((size, size, 3), np.int64)
    edge = size // 2
    image[:, :edge] = (200, 60, 40)
    image[:, edge:] = (40, 80, 200)
    image = np.clip(image + rng.integers(-10, 11, image.shape), 0, 255).astype(np.uint8)
    truth = np.zeros((size, size), np.int64)
    truth[:, edge:] = 1
    x = np.arange(size, dtype=np.float64)[None, :].repeat(size, 0)
    right = 1.0 / (1.0 + np.exp(-(x - (edge + size // 10)) / (size / 16)))
    return image, np.stack([1.0 - right, right]).astype(np.float32), truth


def random_probs(rng, classes, h, w):
    logits = rng.normal(size=(classes, h, w))
    p = np.exp(logits)
    return (p / p.sum(0, keepdims=True)).astype(np.float32)


def test_matches_a_direct_pydensecrf_call():
    rng = np.random.default_rng(1)
    image = rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)
    probs = random_probs(rng, 3, 20, 24)
    params = CRFParams(iters=5, gauss_sxy=2, gauss_compat=4, bilateral_sxy=30, bilateral_srgb=9, bilateral_compat=7)

    crf = dcrf.DenseCRF2D(24, 20, 3)
    crf.setUnaryEnergy(np.ascontiguousarray(unary_from_softmax(probs, clip=1e-5)))
    crf.addPairwiseGaussian(sxy=2, compat=4)
    crf.addPairwiseBilateral(sxy=30, srgb=9, rgbim=np.ascontiguousarray(image), compat=7)
    expected = np.array(crf.inference(5)).reshape(3, 20, 24)

    out = dense_crf(image, probs, params)
    assert out.dtype == np.float32 and out.shape == (3, 20, 24)
    np.testing.assert_array_equal(out, expected.astype(np.float32))
    np.testing.assert_allclose(out.sum(0), 1.0, atol=1e-4)
    np.testing.assert_array_equal(crf_labels(image, probs, params), expected.argmax(0))


def test_crf_snaps_a_blurred_shifted_edge_to_the_image_edge():
    image, probs, truth = edge_scene()
    before = (probs.argmax(0) == truth).mean()
    after = (crf_labels(image, probs, CRFParams()) == truth).mean()
    assert before < 0.92  # the shifted probabilities miss ~6 columns of 64
    assert after >= before + 0.05
    assert after > 0.98


def test_non_contiguous_inputs_give_the_contiguous_answer():
    rng = np.random.default_rng(2)
    image = rng.integers(0, 256, (16, 18, 3), dtype=np.uint8)
    probs = random_probs(rng, 4, 16, 18)
    flipped_image, flipped_probs = image[:, ::-1], probs[:, :, ::-1]
    transposed = np.ascontiguousarray(image.transpose(1, 0, 2)).transpose(1, 0, 2)  # F-order-like strides
    assert not flipped_image.flags.c_contiguous and not transposed.flags.c_contiguous
    np.testing.assert_array_equal(dense_crf(flipped_image, flipped_probs),
                                  dense_crf(flipped_image.copy(), flipped_probs.copy()))
    np.testing.assert_array_equal(dense_crf(transposed, probs), dense_crf(image, probs))


def test_single_class_is_returned_unchanged():
    image = np.zeros((5, 6, 3), np.uint8)
    probs = np.ones((1, 5, 6), np.float64)
    out = dense_crf(image, probs)
    assert out.dtype == np.float32
    np.testing.assert_array_equal(out, probs)


def test_zero_probabilities_are_clipped_not_infinite():
    image, probs, _ = edge_scene(size=16)
    hard = (probs > 0.5).astype(np.float32)  # exact zeros and ones
    out = dense_crf(image, hard)
    assert np.all(np.isfinite(out))


def test_bad_inputs_are_refused_with_a_clear_message():
    image = np.zeros((8, 8, 3), np.uint8)
    with pytest.raises(ValueError, match="differ in size"):
        dense_crf(image, np.full((2, 8, 9), 0.5, np.float32))
    with pytest.raises(ValueError, match=r"\(H, W, 3\)"):
        dense_crf(np.zeros((8, 8), np.uint8), np.full((2, 8, 8), 0.5, np.float32))
    with pytest.raises(ValueError, match="uint8"):
        dense_crf(image.astype(np.float32), np.full((2, 8, 8), 0.5, np.float32))


def test_scaled_shrinks_the_spatial_widths_only():
    small = CRFParams().scaled(0.5)
    assert small.gauss_sxy == 1.5 and small.bilateral_sxy == 25.0
    assert small.bilateral_srgb == CRFParams().bilateral_srgb and small.iters == CRFParams().iters
    # for_size: by the long side against the VOC-size reference (500 px); an (H, W, 3) shape works too
    assert CRFParams().for_size((250, 100)) == small == CRFParams().for_size((100, 250, 3))
