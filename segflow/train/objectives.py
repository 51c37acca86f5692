"""What a training step optimises. The engine owns the loop; an objective owns the loss.

- ``Supervised``: cross-entropy on labelled pixels (255 ignored).
- ``SupCon``: adds a contrastive branch beside the segmentation head. Every Nth step, two extra
  views of the batch are made. Features are pooled per ground-truth class. Pooled features of
  the same class attract across views and images; other classes repel. The targets come from an
  EMA copy of the network, as in DetCon-B.
- ``MeanTeacher``: an EMA teacher labels unlabelled images under weak augmentation. The student
  learns those labels under strong augmentation; the most uncertain pixels are dropped, fewer as
  training goes on.

Each objective runs the (possibly DDP-wrapped) model exactly once per step: extra inputs are
concatenated to the batch, so DDP sees one forward and one backward.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import nn

from segflow.data import IGNORE_INDEX
from segflow.selfsl.regions import mlp, region_loss
from segflow.train.config import MeanTeacherConfig, SupConConfig
from segflow.train.views import photometric_views, random_views, strong_augment


@dataclass
class Step:
    epoch: int
    iteration: int  # global
    seed: int

    def generator(self, salt: int = 0) -> torch.Generator:
        """A CPU generator for this step: the same step always draws the same numbers."""
        return torch.Generator().manual_seed(hash((self.seed, self.epoch, self.iteration, salt)) & 0x7FFFFFFF)


def unwrap(model: nn.Module) -> nn.Module:
    return model.module if hasattr(model, "module") else model


@torch.no_grad()
def ema_update(target: nn.Module, source: nn.Module, momentum: float) -> None:
    for t, s in zip(target.parameters(), source.parameters(), strict=True):
        t.mul_(momentum).add_(s.detach(), alpha=1 - momentum)
    for t, s in zip(target.buffers(), source.buffers(), strict=True):
        t.copy_(s)


class Objective:
    name = "supervised"

    def modules(self) -> dict[str, nn.Module]:
        """Extra trainable modules: optimised and checkpointed beside the model."""
        return {}

    def frozen(self) -> dict[str, nn.Module]:
        """Extra non-trainable modules (EMA copies): checkpointed, not optimised."""
        return {}

    def setup(self, model: nn.Module, device: torch.device) -> None:
        pass

    def loss(self, model: nn.Module, batch: dict, step: Step) -> tuple[torch.Tensor, dict[str, float]]:
        logits = model(batch["image"]).logits
        ce = F.cross_entropy(logits.float(), batch["mask"], ignore_index=IGNORE_INDEX)
        return ce, {"ce": ce.item()}

    def after_step(self, model: nn.Module, step: Step) -> None:
        pass


Supervised = Objective


class SupCon(Objective):
    name = "supcon"

    def __init__(self, cfg: SupConConfig, num_classes: int, feature_channels: int) -> None:
        self.cfg = cfg
        self.num_classes = num_classes
        self.projector = mlp(feature_channels, 256, 128)
        self.predictor = mlp(128, 256, 128)
        self.target: nn.Module | None = None
        self.target_projector: nn.Module | None = None

    def modules(self) -> dict[str, nn.Module]:
        return {"projector": self.projector, "predictor": self.predictor}

    def frozen(self) -> dict[str, nn.Module]:
        return {"target": self.target, "target_projector": self.target_projector}

    def setup(self, model: nn.Module, device: torch.device) -> None:
        self.projector.to(device)
        self.predictor.to(device)
        self.target = copy.deepcopy(unwrap(model)).requires_grad_(False)
        self.target_projector = copy.deepcopy(self.projector).requires_grad_(False)

    def loss(self, model, batch, step):
        images, masks = batch["image"], batch["mask"]
        n = images.shape[0]
        if step.iteration % self.cfg.every:
            return super().loss(model, batch, step)
        v1, m1, v2, m2 = random_views(images, masks, step.generator(1))
        v1, v2 = photometric_views(v1, step.generator(2)), photometric_views(v2, step.generator(3))
        out = model(torch.cat([images, v1, v2]), with_features=True)
        ce = F.cross_entropy(out.logits[:n].float(), masks, ignore_index=IGNORE_INDEX)
        feats = out.features
        with torch.no_grad():
            self.target.train()
            target_feats = self.target(torch.cat([v1, v2]), with_features=True).features
        n_ids = self.num_classes
        heads = (self.projector, self.predictor, self.target_projector)
        g = step.generator(5)
        contrastive = sum(
            region_loss(online, target, n_ids, heads, self.cfg.temperature, self.cfg.num_masks, True, g)
            for online, target in (
                ((feats[n : 2 * n], m1), (target_feats[n:], m2)),
                ((feats[2 * n :], m2), (target_feats[:n], m1)),
            )
        )
        total = ce + self.cfg.weight * contrastive
        return total, {"ce": ce.item(), "contrastive": float(contrastive.detach())}

    def after_step(self, model, step):
        if step.iteration % self.cfg.every == 0:
            ema_update(self.target, unwrap(model), self.cfg.ema_momentum)
            ema_update(self.target_projector, self.projector, self.cfg.ema_momentum)


class MeanTeacher(Objective):
    name = "mean_teacher"

    def __init__(self, cfg: MeanTeacherConfig, unlabeled_batches, epochs: int) -> None:
        if cfg.start_epoch < 0:
            # OTX starts at epoch 1-2 of long runs; on short runs an untrained teacher's labels
            # drown the few real ones, so wait until the student has seen a quarter of training.
            cfg = replace(cfg, start_epoch=max(1, epochs // 4))
        self.cfg = cfg
        self.unlabeled = unlabeled_batches  # callable(step) -> batch dict
        self.teacher: nn.Module | None = None

    def frozen(self) -> dict[str, nn.Module]:
        return {"teacher": self.teacher}

    def setup(self, model, device):
        self.teacher = copy.deepcopy(unwrap(model)).requires_grad_(False)

    def drop_fraction(self, epoch: int) -> float:
        return self.cfg.drop_start * max(0.0, 1.0 - epoch / max(self.cfg.drop_decay_epochs, 1))

    def loss(self, model, batch, step):
        if step.epoch < self.cfg.start_epoch:
            return super().loss(model, batch, step)
        images, masks = batch["image"], batch["mask"]
        n = images.shape[0]
        weak = self.unlabeled(step)["image"].to(images.device)
        with torch.no_grad():
            self.teacher.eval()
            probs = self.teacher(weak).logits.float().softmax(1)
            entropy = -(probs * probs.clamp_min(1e-8).log()).sum(1) / math.log(probs.shape[1])
            pseudo = probs.argmax(1)
            drop = self.drop_fraction(step.epoch)
            if drop > 0:
                limit = torch.quantile(entropy.flatten(1), 1 - drop, dim=1)[:, None, None]
                pseudo[entropy > limit] = IGNORE_INDEX
        strong = strong_augment(weak, step.generator(4))
        logits = model(torch.cat([images, strong])).logits.float()
        ce = F.cross_entropy(logits[:n], masks, ignore_index=IGNORE_INDEX)
        unsup = F.cross_entropy(logits[n:], pseudo, ignore_index=IGNORE_INDEX)  # mean over kept pixels
        return ce + self.cfg.weight * unsup, {"ce": ce.item(), "unsup": unsup.item(), "dropped": drop}

    def after_step(self, model, step):
        # Before the teacher starts, it simply follows the student.
        momentum = self.cfg.ema_momentum if step.epoch >= self.cfg.start_epoch else 0.0
        ema_update(self.teacher, unwrap(model), momentum)
