"""ConfusionMatrix: the one mIoU accumulator (METHOD.md sec 4: counts summed over the split)."""

import math

import numpy as np
import pytest
import torch

from wsss.metrics import ConfusionMatrix

# 4x4 truth and prediction over 3 classes (0 bg, 1, 2); two truth pixels are ignored (255).
TRUTH = torch.tensor([
    [0, 0, 1, 1],
    [0, 0, 1, 1],
    [2, 2, 2, 255],
    [2, 2, 2, 255],
])
PRED = torch.tensor([
    [0, 1, 1, 1],
    [0, 0, 1, 0],
    [2, 2, 1, 0],
    [2, 0, 2, 2],
])
# Counted by hand (rows truth, columns prediction), 14 counted pixels:
HAND_MATRIX = [
    [3, 1, 0],
    [1, 3, 0],
    [1, 1, 4],
]
# IoU = tp / (row + col - tp): class 0: 3/(4+5-3), class 1: 3/(4+5-3), class 2: 4/(6+4-4)
HAND_IOU = [0.5, 0.5, 2 / 3]
HAND_MIOU = 5 / 9
HAND_ACC = 10 / 14


def brute_force_matrix(pred, target, n, ignore=255):
    """Pixel by pixel count, the slow reference."""
    mat = np.zeros((n, n), dtype=np.int64)
    for p, t in zip(np.asarray(pred).ravel(), np.asarray(target).ravel()):
        if t != ignore:
            mat[t, p] += 1
    return mat


def test_hand_made_case():
    cm = ConfusionMatrix(3)
    cm.update(PRED, TRUTH)
    assert cm.mat.tolist() == HAND_MATRIX
    out = cm.compute()
    assert out["iou"] == pytest.approx(HAND_IOU)
    assert out["miou"] == pytest.approx(HAND_MIOU)
    assert out["pixel_acc"] == pytest.approx(HAND_ACC)


def test_matches_brute_force_on_random_masks_and_ignores_255():
    rng = np.random.default_rng(0)
    n = 5
    cm = ConfusionMatrix(n)
    total = np.zeros((n, n), dtype=np.int64)
    for _ in range(4):
        target = rng.integers(n, size=(9, 7)).astype(np.uint8)
        target[rng.random(target.shape) < 0.2] = 255
        pred = rng.integers(n, size=(9, 7))
        cm.update(torch.from_numpy(pred), torch.from_numpy(target))
        total += brute_force_matrix(pred, target, n)
    np.testing.assert_array_equal(cm.mat.numpy(), total)
    assert cm.mat.sum() < 4 * 9 * 7  # ignored pixels are not counted


def test_ignored_pixels_do_not_count_whatever_the_prediction():
    cm = ConfusionMatrix(3)
    cm.update(torch.tensor([1, 2, 0]), torch.tensor([1, 255, 255]))
    assert cm.mat.sum() == 1
    assert cm.compute()["pixel_acc"] == 1.0


def test_numpy_uint8_masks_are_accepted():
    cm = ConfusionMatrix(3)
    cm.update(PRED.numpy().astype(np.uint8), TRUTH.numpy().astype(np.uint8))
    assert cm.mat.tolist() == HAND_MATRIX


def test_accumulated_matrix_is_not_a_mean_of_per_image_ious():
    # image A: all class 1, predicted perfectly; image B: three bg pixels and one class-1 pixel
    # that is predicted as bg.
    images = [
        (torch.tensor([1, 1, 1, 1]), torch.tensor([1, 1, 1, 1])),
        (torch.tensor([0, 0, 0, 0]), torch.tensor([0, 0, 0, 1])),
    ]
    per_image = []
    for pred, target in images:
        one = ConfusionMatrix(2)
        one.update(pred, target)
        per_image.append(one.compute()["miou"])
    assert per_image == pytest.approx([1.0, (3 / 4 + 0) / 2])

    acc = ConfusionMatrix(2)
    for pred, target in images:
        acc.update(pred, target)
    big = ConfusionMatrix(2)
    big.update(torch.cat([p for p, _ in images]), torch.cat([t for _, t in images]))
    assert torch.equal(acc.mat, big.mat)
    # over the split: bg IoU 3/4 (3 tp, 1 fp), class 1 IoU 4/5 (4 tp, 1 fn)
    assert acc.compute()["iou"] == pytest.approx([3 / 4, 4 / 5])
    assert acc.compute()["miou"] == pytest.approx(0.775)
    assert acc.compute()["miou"] != pytest.approx(np.mean(per_image))


def test_merge_and_reset():
    a, b, both = ConfusionMatrix(3), ConfusionMatrix(3), ConfusionMatrix(3)
    a.update(PRED[:2], TRUTH[:2])
    b.update(PRED[2:], TRUTH[2:])
    both.update(PRED, TRUTH)
    a.merge(b)
    assert torch.equal(a.mat, both.mat)
    a.reset()
    assert a.mat.sum() == 0


def test_perfect_prediction_gives_one():
    target = TRUTH.clone()
    pred = target.clone()
    pred[pred == 255] = 0
    cm = ConfusionMatrix(3)
    cm.update(pred, target)
    out = cm.compute()
    assert out["iou"] == [1.0, 1.0, 1.0]
    assert out["miou"] == 1.0 and out["pixel_acc"] == 1.0


def test_absent_class_is_nan_and_left_out_of_the_mean():
    cm = ConfusionMatrix(4)  # class 3 appears in neither truth nor prediction
    cm.update(PRED, TRUTH)
    out = cm.compute()
    assert math.isnan(out["iou"][3])
    assert out["iou"][:3] == pytest.approx(HAND_IOU)
    assert out["miou"] == pytest.approx(HAND_MIOU)


def test_class_only_predicted_counts_as_zero():
    cm = ConfusionMatrix(3)
    cm.update(torch.tensor([0, 2]), torch.tensor([0, 0]))
    out = cm.compute()
    assert out["iou"][0] == pytest.approx(0.5) and out["iou"][2] == 0.0 and math.isnan(out["iou"][1])
    assert out["miou"] == pytest.approx(0.25)


def test_empty_matrix_gives_nan():
    out = ConfusionMatrix(3).compute()
    assert math.isnan(out["miou"]) and math.isnan(out["pixel_acc"])


@pytest.mark.parametrize("pred, target", [
    ([0, 1], [0, 3]),      # target label == num_classes
    ([0, 1], [0, -1]),     # negative target
    ([0, 3], [0, 1]),      # prediction out of range
    ([0, 255], [0, 1]),    # ignore value predicted on a counted pixel
    ([0, -2], [0, 1]),     # negative prediction
])
def test_labels_out_of_range_raise(pred, target):
    with pytest.raises(ValueError, match="outside"):
        ConfusionMatrix(3).update(torch.tensor(pred), torch.tensor(target))


def test_size_mismatch_raises():
    with pytest.raises(ValueError, match="shape"):
        ConfusionMatrix(3).update(torch.zeros(4, 4), torch.zeros(4, 5))


def test_error_names_the_negative_label():
    with pytest.raises(ValueError, match="-1"):
        ConfusionMatrix(3).update(torch.tensor([0, 1]), torch.tensor([0, -1]))


def test_transposed_mask_raises():
    with pytest.raises(ValueError, match="shape"):
        ConfusionMatrix(3).update(torch.zeros(2, 8), torch.zeros(4, 4))
