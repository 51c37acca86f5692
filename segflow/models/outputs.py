"""What is computed from a segmentation model's logits, in one place: resizing, probabilities,
the entropy measures that prediction and adaptation use, and the confident pseudo-labels that Mean
Teacher and DACS learn from."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def upsample(logits: torch.Tensor, size: tuple[int, int] | torch.Size) -> torch.Tensor:
    """N x C x h x w logits to N x C x H x W (bilinear); unchanged when already that size."""
    if tuple(logits.shape[-2:]) == tuple(size):
        return logits
    return F.interpolate(logits, size=tuple(size), mode="bilinear", align_corners=False)


def probabilities(logits: torch.Tensor, size: tuple[int, int] | torch.Size | None = None) -> torch.Tensor:
    """Softmax over classes (float32), after resizing to ``size`` when given."""
    logits = logits.float()
    if size is not None:
        logits = upsample(logits, size)
    return logits.softmax(1)


def self_information(probs: torch.Tensor) -> torch.Tensor:
    """ADVENT's weighted self-information map: -P log P / log C per class (N x C x H x W)."""
    return -probs * probs.clamp_min(1e-8).log() / math.log(probs.shape[1])


def entropy_map(probs: torch.Tensor) -> torch.Tensor:
    """Normalised entropy per pixel, in [0, 1] (N x H x W): the sum of the self-information map."""
    return self_information(probs).sum(1)


def pseudo_labels(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A teacher's pseudo-labels (argmax, N x H x W) and its probability of each (N x H x W): Mean
    Teacher learns from the pixels above a threshold, DACS weights its mixed loss by either."""
    confidence, labels = probabilities(logits).max(1)
    return labels, confidence
