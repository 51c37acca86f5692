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
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from segflow.data.datasets import SegmentationDataset
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


def _freeze_batch_norm(model: nn.Module) -> None:
    # Batch statistics of a few small batches would drift the running means the trained model
    # relies on; QAT fine-tunes the weights and the quantisers' ranges only.
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.eval()


def distillation(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Per-pixel KL divergence of the student's class distribution from the teacher's, averaged."""
    return F.kl_div(F.log_softmax(student.float(), 1), F.log_softmax(teacher.float(), 1), log_target=True,
                    reduction="none").sum(1).mean()  # fmt: skip


def fine_tune(
    model: nn.Module, images: SegmentationDataset, cfg: QATConfig, teacher: nn.Module | None = None
) -> nn.Module:
    """Train the fake-quantised ``model`` (logits out) for ``cfg.steps`` on ``images`` (train mode):
    cross-entropy on the labels, plus distillation from ``teacher`` (the float model, logits out)
    when given, so the INT8 model learns to answer as the float one does."""
    if cfg.steps <= 0:
        return model.eval()
    generator = torch.Generator().manual_seed(cfg.seed)
    loader = DataLoader(images, batch_size=cfg.batch_size, shuffle=True, drop_last=len(images) >= cfg.batch_size,
                        generator=generator)  # fmt: skip
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=cfg.lr)
    model.train()
    _freeze_batch_norm(model)
    step = 0
    while step < cfg.steps:
        for batch in loader:
            logits = model(batch["image"])
            loss = cross_entropy(logits, batch["mask"])
            if teacher is not None:
                with torch.no_grad():
                    target = teacher(batch["image"])
                loss = loss + distillation(logits, target)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            step += 1
            if step >= cfg.steps:
                break
    return model.eval()
