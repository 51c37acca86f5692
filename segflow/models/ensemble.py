"""Several models that vote: their softmax outputs averaged (ADVENT's MinEnt + AdvEnt combination).

The ensemble returns log(mean probability) as its logits, so argmax, softmax and entropy work on
it exactly as on one model, and it evaluates, exports to OpenVINO and predicts like one.
"""

from __future__ import annotations

import torch
from torch import nn

from segflow.models import SegOutput
from segflow.models.outputs import probabilities


class Ensemble(nn.Module):
    """``members`` see the ensemble's input re-normalised to their own statistics: member i gets
    ``x * scales[i] + shifts[i]`` (identity when they were all trained on the same data)."""

    name = "ensemble"

    def __init__(self, members: list[nn.Module], scales: list[list[float]], shifts: list[list[float]]) -> None:
        super().__init__()
        self.members = nn.ModuleList(members)
        self.num_classes = members[0].num_classes
        self.aux_head = None
        for i, (scale, shift) in enumerate(zip(scales, shifts, strict=True)):
            self.register_buffer(f"scale_{i}", torch.tensor(scale).view(1, -1, 1, 1), persistent=False)
            self.register_buffer(f"shift_{i}", torch.tensor(shift).view(1, -1, 1, 1), persistent=False)

    def forward(self, x: torch.Tensor, **_) -> SegOutput:
        total = None
        for i, member in enumerate(self.members):
            inputs = x * getattr(self, f"scale_{i}") + getattr(self, f"shift_{i}")
            probs = probabilities(member(inputs).logits)  # members answer at input resolution
            total = probs if total is None else total + probs
        return SegOutput(logits=(total / len(self.members)).clamp_min(1e-8).log())
