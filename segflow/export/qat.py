"""Quantisation-aware fine-tuning (NNCF): INT8 everywhere NNCF can place it, then a short
fine-tuning on labelled images so the weights learn to live with 8-bit activations.

Post-training INT8 of Lite-HRNet must leave the gates and the head in float to stay accurate, and
those float islands cost more in reorders than INT8 saves. Fine-tuning with the quantisers in the
graph ("QAT", the NNCF and OpenVINO guides' recipe: start from the trained weights, a short run)
lets the fast placement keep most of its accuracy instead. Distillation from the float model
(Hinton et al. 2015) recovers more than the labels alone (benchmarks/RESULTS.md, "INT8 that pays").
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from segflow.data.datasets import SegmentationDataset
from segflow.train.loop import LoopConfig, Training, fit
from segflow.train.objective import Objective, Recipe, Step
from segflow.train.objectives import cross_entropy


@dataclass(frozen=True)
class QATConfig:
    steps: int = 200  # fine-tuning steps; 0: post-training quantisation only
    lr: float = 3e-4  # Adam
    batch_size: int = 8
    seed: int = 0


def quantize_torch(model: nn.Module, calibration: list[torch.Tensor]) -> nn.Module:
    """``model`` (eval mode, logits out) with NNCF's fake quantisers at its default places."""
    # The quantisers' C++ kernels compile on first use; under load that can outlast NNCF's
    # 60 s guard, which then fails the export. No limit: a slow build is only slow.
    os.environ.setdefault("NNCF_EXTENSION_LOAD_TIMEOUT", "0")
    import nncf

    return nncf.quantize(
        model.eval(),
        nncf.Dataset(calibration),
        subset_size=len(calibration),
        preset=nncf.QuantizationPreset.MIXED,
    )


def distillation(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Per-pixel KL divergence of the student's class distribution from the teacher's, averaged."""
    return F.kl_div(F.log_softmax(student.float(), 1), F.log_softmax(teacher.float(), 1), log_target=True,
                    reduction="none").sum(1).mean()  # fmt: skip


class QATObjective(Objective):
    """The engine's plug for quantisation-aware fine-tuning: cross-entropy on the labels plus
    distillation from the float model (logits out), so the INT8 model learns to answer as the
    float one does. The model is the fake-quantised copy, which outputs plain logits."""

    name = "qat"

    def __init__(self, teacher: nn.Module) -> None:
        self.teacher = teacher.eval()
        self.model: nn.Module | None = None

    def setup(self, model: nn.Module, device: torch.device) -> None:
        self.model = model
        self.teacher.to(device)

    def frozen(self) -> dict[str, nn.Module]:
        return {"teacher": self.teacher}

    def train(self) -> None:
        # Batch statistics of a few small batches would drift the running means the trained model
        # relies on; QAT fine-tunes the weights and the quantisers' ranges only.
        for module in self.model.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.eval()

    def loss(self, net: nn.Module, batch: dict, step: Step) -> tuple[torch.Tensor, dict[str, float]]:
        logits = net(batch["image"])
        with torch.no_grad():
            target = self.teacher(batch["image"])
        ce, kd = cross_entropy(logits, batch["mask"]), distillation(logits, target)
        return ce + kd, {"ce": ce.item(), "kd": kd.item()}


def fine_tune(model: nn.Module, images: SegmentationDataset, cfg: QATConfig, teacher: nn.Module) -> nn.Module:
    """Train the fake-quantised ``model`` (logits out) for ``cfg.steps`` on ``images`` on the one
    training engine (one epoch of exactly that many steps, checkpoints in a folder removed after)."""
    if cfg.steps <= 0:
        return model.eval()
    loop = LoopConfig(epochs=1, batch_size=cfg.batch_size, seed=cfg.seed, iters_per_epoch=cfg.steps,
                      exact_iters=True, amp="off", channels_last="off", loader_workers=0)  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="segflow-qat-") as folder:
        run = Training(build_model=lambda: model, objective=QATObjective(teacher), data=images, loop=loop,
                       recipe=Recipe(lr=cfg.lr), checkpoints=Path(folder) / "checkpoints")  # fmt: skip
        fit(run)
    return model.cpu().eval()
