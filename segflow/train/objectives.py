"""What segmentation training optimises, beyond plain cross-entropy (the engine's base objective).

- ``SupCon``: a contrastive branch beside the segmentation head. Every Nth step the batch's two
  extra views (DetCon-B views cut from the label maps, made by the dataset) go through the
  network too; pooled features of the same class attract across views and images, other
  classes repel. The targets come from an EMA copy of the network, as in DetCon-B.
- ``MeanTeacher``: an EMA teacher labels unlabelled images under weak augmentation; the student
  learns those labels under strong augmentation, only where the teacher is confident (FixMatch,
  UniMatch), after a supervised warm-up and with a weight that ramps up.

Each objective runs the (possibly DDP-wrapped) model once per step: extra inputs are
concatenated to the batch, so DDP sees one forward and one backward.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from segflow.data import IGNORE_INDEX
from segflow.models.outputs import pseudo_labels
from segflow.train.config import MeanTeacherConfig, SupConConfig
from segflow.train.contrastive import ContrastBranch, ContrastObjective
from segflow.train.objective import Objective, Stream, ema_update, frozen_copy

Supervised = Objective


def cross_entropy(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.float(), target, ignore_index=IGNORE_INDEX)


class SupCon(ContrastObjective):
    name = "supcon"

    def __init__(self, cfg: SupConConfig, num_classes: int, feature_channels: int) -> None:
        self.cfg = cfg
        self.num_classes = num_classes
        self.branch = ContrastBranch(feature_channels, cfg.temperature, cfg.num_masks, cfg.ema_momentum, by_class=True)

    def loss(self, net, batch, step):
        if step.iteration % self.cfg.every:
            return super().loss(net, batch, step)
        images, masks = batch["image"], batch["mask"]
        v1, m1, v2, m2 = batch["v1"], batch["m1"], batch["v2"], batch["m2"]
        n = images.shape[0]
        out = net(torch.cat([images, v1, v2]), with_features=True)
        ce = cross_entropy(out.logits[:n], masks)
        with torch.no_grad():
            self.branch.target.train()
            target = self.branch.target(torch.cat([v1, v2]), with_features=True).features
        online = (out.features[n : 2 * n], out.features[2 * n :])
        contrast = self.branch.loss(online, (target[:n], target[n:]), (m1, m2), self.num_classes, step.generator(5))
        total = ce + self.cfg.weight * contrast
        return total, {"ce": ce.item(), "contrastive": float(contrast.detach())}

    def after_step(self, net, step):
        if step.iteration % self.cfg.every == 0:  # the targets move only when the branch was trained
            super().after_step(net, step)


class MeanTeacher(Objective):
    """Semi-supervision that does not hurt on short runs (issue: the older entropy-quantile teacher
    cost 7-13 mDice): the student learns from labels alone for the warm-up steps while the teacher
    copies it; then the teacher is an EMA of the student and its pseudo-labels count only where it
    is at least ``confidence`` sure, averaged over all unlabelled pixels, so an unsure teacher
    teaches little. The weight ramps linearly from 0 to ``weight``."""

    name = "mean_teacher"

    def __init__(self, cfg: MeanTeacherConfig, unlabeled: Stream) -> None:
        self.cfg = cfg
        self.unlabeled = unlabeled
        self.teacher: nn.Module | None = None

    def streams(self) -> dict[str, Stream]:
        return {"unlabeled": self.unlabeled}

    def frozen(self) -> dict[str, nn.Module]:
        return {"teacher": self.teacher}

    def setup(self, model, device):
        super().setup(model, device)
        self.teacher = frozen_copy(model)

    def schedule(self, step) -> tuple[int, int]:
        """(warm-up steps, ramp steps) for this run; -1 means a share of all steps."""
        warmup = self.cfg.warmup_steps if self.cfg.warmup_steps >= 0 else step.total // 3
        ramp = self.cfg.ramp_steps if self.cfg.ramp_steps >= 0 else step.total // 5
        return warmup, ramp

    def unsup_weight(self, step) -> float:
        warmup, ramp = self.schedule(step)
        if step.iteration < warmup:
            return 0.0
        return self.cfg.weight * min(1.0, (step.iteration - warmup + 1) / max(ramp, 1))

    def loss(self, net, batch, step):
        weight = self.unsup_weight(step)
        if weight == 0:
            return super().loss(net, batch, step)
        images, masks = batch["image"], batch["mask"]
        n = images.shape[0]
        weak, strong = batch["unlabeled"]["image"], batch["unlabeled"]["strong"]
        with torch.no_grad():
            self.teacher.eval()
            pseudo, confidence = pseudo_labels(self.teacher(weak).logits)
            confident = confidence >= self.cfg.confidence
        logits = net(torch.cat([images, strong])).logits
        ce = cross_entropy(logits[:n], masks)
        per_pixel = F.cross_entropy(logits[n:].float(), pseudo, reduction="none")
        unsup = (per_pixel * confident.float()).mean()
        logs = {"ce": ce.item(), "unsup": unsup.item(), "confident_share": confident.float().mean().item()}
        return ce + weight * unsup, logs | {"unsup_weight": weight}

    def after_step(self, net, step):
        # During the warm-up the teacher simply follows the student.
        warmup, _ = self.schedule(step)
        ema_update(self.teacher, net, self.cfg.ema_momentum if step.iteration >= warmup else 0.0)
