"""The one confusion-matrix accumulator behind every mIoU in the project, and the average
precision of the classifier's image-level scores."""

from __future__ import annotations

import numpy as np
import torch

from wsss.classes import IGNORE_INDEX


class ConfusionMatrix:
    """Accumulates a (C, C) confusion matrix over a whole split (rows: truth, cols: prediction).

    ``num_classes`` counts background, so K foreground classes give K + 1. Pixels whose
    target is ``ignore_index`` are skipped. Works on any device; metrics are computed from
    the summed counts, not averaged per image.
    """

    def __init__(self, num_classes: int, device: torch.device | str = "cpu", ignore_index: int = IGNORE_INDEX):
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.mat = torch.zeros(num_classes, num_classes, dtype=torch.int64, device=device)

    def update(self, pred: torch.Tensor, target: torch.Tensor) -> None:
        pred = torch.as_tensor(pred, device=self.mat.device)
        target = torch.as_tensor(target, device=self.mat.device)
        if pred.squeeze().shape != target.squeeze().shape:
            raise ValueError(f"prediction has shape {tuple(pred.shape)} but target has shape {tuple(target.shape)}")
        pred, target = pred.reshape(-1).long(), target.reshape(-1).long()
        keep = target != self.ignore_index
        pred, target = pred[keep], target[keep]
        n = self.num_classes
        for what, x in (("target", target), ("prediction", pred)):
            bad = x[(x < 0) | (x >= n)]
            if bad.numel():
                extra = f" (and {self.ignore_index} = ignore)" if what == "target" else ""
                raise ValueError(f"{what} holds label {int(bad[0])} outside 0..{n - 1}{extra}")
        self.mat += torch.bincount(target * n + pred, minlength=n * n).reshape(n, n)

    def reset(self) -> None:
        self.mat.zero_()

    def merge(self, other: "ConfusionMatrix") -> None:
        self.mat += other.mat.to(self.mat.device)

    def compute(self) -> dict:
        """Per-class IoU (NaN for a class absent from both truth and prediction), mIoU over
        the classes that occur, and pixel accuracy."""
        m = self.mat.double()
        tp = m.diag()
        union = m.sum(0) + m.sum(1) - tp
        iou = tp / union  # 0/0 -> nan for classes never seen
        valid = union > 0
        miou = iou[valid].mean().item() if valid.any() else float("nan")
        total = m.sum()
        acc = (tp.sum() / total).item() if total > 0 else float("nan")
        return {"iou": iou.tolist(), "miou": miou, "pixel_acc": acc}


def average_precision(scores: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Per-class average precision (K,) of scores (N, K) against 0/1 labels (N, K).

    AP is the area under the precision-recall step curve: sum over the distinct score
    thresholds t (descending) of (R(t) - R(t_prev)) * P(t), ties counted together, which
    without ties is the mean over positives of the precision at each positive's rank.
    A class without positives gets NaN.
    """
    scores = np.asarray(scores, dtype=np.float64)
    labels = np.asarray(labels) > 0
    if scores.shape != labels.shape or scores.ndim != 2:
        raise ValueError(f"scores {scores.shape} and labels {labels.shape} must both be (N, K)")
    ap = np.full(scores.shape[1], np.nan)
    for k in range(scores.shape[1]):
        pos = labels[:, k].sum()
        if pos == 0:
            continue
        order = np.argsort(-scores[:, k], kind="stable")
        s, y = scores[order, k], labels[order, k]
        tp = np.cumsum(y)
        last_of_tie = np.r_[s[1:] != s[:-1], True]  # evaluate only where the threshold changes
        tp, n = tp[last_of_tie], np.arange(1, len(s) + 1)[last_of_tie]
        precision, recall = tp / n, tp / pos
        ap[k] = np.sum(np.diff(np.r_[0.0, recall]) * precision)
    return ap


def mean_average_precision(scores: np.ndarray, labels: np.ndarray) -> float:
    """Mean AP over the classes that have positives (NaN when none has)."""
    ap = average_precision(scores, labels)
    return float(np.nanmean(ap)) if np.isfinite(ap).any() else float("nan")
