"""wsss.pseudo: the pseudo-mask rules of METHOD.md section 3 on hand-made score maps."""

import numpy as np
import pytest

from wsss.pseudo import PseudoMaskParams, background_score, conflict_mask, score_stack, scores_to_mask

IGNORE = 255


def params(**kw):
    """Rule tests run without CRF and without the min-foreground rule unless they ask."""
    kw.setdefault("use_crf", False)
    kw.setdefault("min_fg_fraction", 0.0)
    return PseudoMaskParams(**kw)


def test_power_background_value():
    maps = np.array([[[0.0, 0.5, 1.0, 0.2]], [[0.1, 0.25, 0.3, 0.9]]], np.float32)  # (2, 1, 4)
    bg = background_score(maps, params(bg_mode="power", alpha=4))
    np.testing.assert_allclose(bg, [[0.9 ** 4, 0.5 ** 4, 0.0, 0.1 ** 4]], rtol=1e-6, atol=1e-7)
    bg3 = background_score(maps, params(bg_mode="power", alpha=3))
    np.testing.assert_allclose(bg3, [[0.9 ** 3, 0.5 ** 3, 0.0, 0.1 ** 3]], rtol=1e-6, atol=1e-7)


def test_threshold_and_saliency_backgrounds():
    maps = np.zeros((1, 2, 2), np.float32)
    np.testing.assert_array_equal(background_score(maps, params(bg_mode="threshold", bg_threshold=0.2)),
                                  np.full((2, 2), 0.2, np.float32))
    saliency = np.array([[0.0, 0.25], [0.75, 1.0]], np.float32)
    np.testing.assert_allclose(background_score(maps, params(bg_mode="saliency"), saliency), 1 - saliency)
    with pytest.raises(ValueError, match="saliency"):
        background_score(maps, params(bg_mode="saliency"))


def test_floor_drops_scores_below_it():
    # constant background 0.2: a 0.25 score would beat it, but the 0.3 floor drops it
    maps = np.array([[[0.25, 0.29, 0.3, 0.35]]], np.float32)
    mask = scores_to_mask(None, maps, [5], params(bg_mode="threshold", bg_threshold=0.2))
    np.testing.assert_array_equal(mask, [[0, 0, 5, 5]])
    stack = score_stack(maps, params(bg_mode="threshold", bg_threshold=0.2))
    np.testing.assert_allclose(stack[1], [[0, 0, 0.3, 0.35]])
    no_floor = scores_to_mask(None, maps, [5], params(bg_mode="threshold", bg_threshold=0.2, score_floor=0.0))
    np.testing.assert_array_equal(no_floor, [[5, 5, 5, 5]])


def test_class_ids_map_channels_to_labels_and_argmax_picks_the_highest():
    maps = np.array([[[0.9, 0.4, 0.0]], [[0.5, 0.8, 0.1]]], np.float32)
    mask = scores_to_mask(None, maps, [3, 7], params())
    assert mask.dtype == np.uint8
    np.testing.assert_array_equal(mask, [[3, 7, 0]])


def test_two_channels_above_conflict_become_ignore():
    maps = np.array([[[0.995, 0.995, 0.98, 0.995]],
                     [[0.992, 0.98, 0.995, 0.2]]], np.float32)
    mask = scores_to_mask(None, maps, [1, 2], params())
    np.testing.assert_array_equal(mask, [[IGNORE, 1, 2, 1]])
    np.testing.assert_array_equal(conflict_mask(maps, 0.99), [[True, False, False, False]])


def test_background_does_not_count_towards_a_conflict():
    # saliency mode: bg = 1 - 0.005 = 0.995 > 0.99 and the class 0.998 > 0.99: only one
    # class channel is above 0.99, so no conflict; the class wins the argmax
    maps = np.full((1, 1, 1), 0.998, np.float32)
    saliency = np.full((1, 1), 0.005, np.float32)
    mask = scores_to_mask(None, maps, [4], params(bg_mode="saliency"), saliency=saliency)
    np.testing.assert_array_equal(mask, [[4]])


def test_saliency_background_and_salient_pixels_left_as_background():
    saliency = np.array([[0.0, 0.9, 0.9, 0.2]], np.float32)
    maps = np.array([[[0.1, 0.1, 0.95, 0.5]]], np.float32)
    # bg = 1 - saliency = [1, 0.1, 0.1, 0.8]; class (floored) = [0, 0, 0.95, 0.5]
    mask = scores_to_mask(None, maps, [6], params(bg_mode="saliency"), saliency=saliency)
    np.testing.assert_array_equal(mask, [[0, IGNORE, 6, 0]])


def test_images_with_too_little_foreground_are_ignored_whole():
    maps = np.zeros((1, 20, 20), np.float32)
    maps[0, 0, :3] = 0.9  # 3 of 400 pixels = 0.75 % foreground
    mask = scores_to_mask(None, maps, [2], params(min_fg_fraction=0.01))
    assert np.all(mask == IGNORE)
    maps[0, 0, 3] = 0.9  # 4 of 400 = 1 %: not under 1 %, kept
    mask = scores_to_mask(None, maps, [2], params(min_fg_fraction=0.01))
    assert (mask == 2).sum() == 4 and (mask == 0).sum() == 396


def test_image_without_classes():
    maps = np.zeros((0, 4, 4), np.float32)
    assert np.all(scores_to_mask(None, maps, [], params(min_fg_fraction=0.01)) == IGNORE)
    assert np.all(scores_to_mask(None, maps, [], params()) == 0)
    image = np.zeros((4, 4, 3), np.uint8)
    assert np.all(scores_to_mask(image, maps, [], params(use_crf=True)) == 0)


def test_bad_inputs_are_refused():
    maps = np.full((2, 3, 3), 0.5, np.float32)
    with pytest.raises(ValueError, match="class_ids"):
        scores_to_mask(None, maps, [1], params())
    with pytest.raises(ValueError, match="class_ids"):
        scores_to_mask(None, maps, [0, 1], params())
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        scores_to_mask(None, maps * 3, [1, 2], params())
    with pytest.raises(ValueError, match="image"):
        scores_to_mask(None, maps, [1, 2], params(use_crf=True))
    with pytest.raises(ValueError, match="bg_mode"):
        PseudoMaskParams(bg_mode="nope")


def blurred_object_scene(size=48):
    """A bright square object on a dark background, and a class map that is a Gaussian
    blob, shifted and wider than the object (as a CAM leaking onto the background)."""
    rng = np.random.default_rng(0)
    image = np.full((size, size, 3), 30, np.int64)
    truth = np.zeros((size, size), np.uint8)
    lo, hi = size // 4, 3 * size // 4
    image[lo:hi, lo:hi] = (220, 200, 60)
    truth[lo:hi, lo:hi] = 3
    image = np.clip(image + rng.integers(-8, 9, image.shape), 0, 255).astype(np.uint8)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64)
    centre = size / 2 + size / 16
    blob = np.exp(-((yy - centre) ** 2 + (xx - centre) ** 2) / (2 * (size / 4) ** 2))
    return image, (blob / blob.max())[None].astype(np.float32), truth


def test_crf_snaps_the_mask_to_the_object_and_keeps_conflicts_ignored():
    image, maps, truth = blurred_object_scene()
    no_crf = scores_to_mask(image, maps, [3], PseudoMaskParams(use_crf=False))
    with_crf = scores_to_mask(image, maps, [3], PseudoMaskParams(use_crf=True))
    assert set(np.unique(with_crf)) <= {0, 3}
    acc_before, acc_after = (no_crf == truth).mean(), (with_crf == truth).mean()
    assert acc_after >= acc_before + 0.05 and acc_after > 0.95

    # a second class equal to the first at its peak: pixels > 0.99 in both stay 255 after CRF
    two = np.concatenate([maps, maps], axis=0)
    mask = scores_to_mask(image, two, [3, 4], PseudoMaskParams(use_crf=True))
    conflicted = (maps[0] > 0.99)
    assert conflicted.any()
    assert np.all(mask[conflicted] == IGNORE)
    assert np.all(mask[~conflicted] != IGNORE)


def test_saliency_rule_reads_the_label_after_crf():
    image, maps, truth = blurred_object_scene()
    saliency = np.zeros(truth.shape, np.float32)
    saliency[8:40, 8:40] = 0.9  # salient box larger than the object
    mask = scores_to_mask(image, maps, [3], PseudoMaskParams(bg_mode="saliency", use_crf=True), saliency=saliency)
    salient = saliency > 0.5
    assert not np.any(salient & (mask == 0))  # no salient pixel is called background
    assert np.any(mask == 3) and np.any(mask == IGNORE) and np.any(mask == 0)
