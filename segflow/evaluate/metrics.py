"""Segmentation metrics from one confusion matrix accumulated over the whole set.

Dice and IoU per class come from the set-level counts (not averaged per image). Pixels labelled
255 are left out. A class that appears neither in the ground truth nor in the predictions has no
score (NaN) and is left out of the means; background counts like any other class.
"""

from __future__ import annotations

import numpy as np
import torch

from segflow.data import IGNORE_INDEX


class ConfusionMatrix:
    def __init__(self, num_classes: int) -> None:
        self.num_classes = num_classes
        self.matrix = torch.zeros(num_classes, num_classes, dtype=torch.int64)  # rows: truth, cols: prediction

    def update(self, pred: torch.Tensor, target: torch.Tensor) -> None:
        keep = target != IGNORE_INDEX
        t, p = target[keep].to(torch.int64), pred[keep].to(torch.int64)
        n = self.num_classes
        self.matrix += torch.bincount(t * n + p, minlength=n * n).reshape(n, n).cpu()

    def merge(self, other: torch.Tensor) -> None:
        self.matrix += other.cpu()

    def scores(self) -> dict:
        m = self.matrix.double().numpy()
        tp = np.diag(m)
        fp = m.sum(0) - tp
        fn = m.sum(1) - tp
        with np.errstate(invalid="ignore", divide="ignore"):
            dice = np.where(2 * tp + fp + fn > 0, 2 * tp / (2 * tp + fp + fn), np.nan)
            iou = np.where(tp + fp + fn > 0, tp / (tp + fp + fn), np.nan)
        total = m.sum()
        return {
            "mDice": float(np.nanmean(dice)) if np.isfinite(dice).any() else 0.0,
            "mIoU": float(np.nanmean(iou)) if np.isfinite(iou).any() else 0.0,
            "pixel_accuracy": float(tp.sum() / total) if total else 0.0,
            "dice": [None if np.isnan(v) else float(v) for v in dice],
            "iou": [None if np.isnan(v) else float(v) for v in iou],
            "pixels": int(total),
        }
