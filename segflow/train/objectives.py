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
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from segflow.train.config import MeanTeacherConfig, SupConConfig
from segflow.train.views import photometric_views, random_views, strong_augment

IGNORE = 255


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
        ce = F.cross_entropy(logits.float(), batch["mask"], ignore_index=IGNORE)
        return ce, {"ce": ce.item()}

    def after_step(self, model: nn.Module, step: Step) -> None:
        pass


Supervised = Objective


def _mlp(cin: int, hidden: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(cin, hidden), nn.BatchNorm1d(hidden), nn.ReLU(inplace=True), nn.Linear(hidden, cout))


def pool_by_mask(features: torch.Tensor, masks: torch.Tensor, num_classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean feature of every (image, class) region. Returns (R x C features, R x 2 [image, class])."""
    _n, _c, h, w = features.shape
    small = F.interpolate(masks[:, None].float(), size=(h, w), mode="nearest")[:, 0].long()
    onehot = F.one_hot(small.clamp(max=num_classes), num_classes + 1)[..., :num_classes]  # drop ignore
    onehot = onehot.permute(0, 3, 1, 2).to(features.dtype)  # N x K x h x w
    area = onehot.sum((2, 3))  # N x K
    pooled = torch.einsum("nchw,nkhw->nkc", features, onehot) / area.clamp(min=1)[..., None]
    keep = area > 0
    ids = keep.nonzero()
    return pooled[keep], ids


def supervised_contrastive(queries: torch.Tensor, keys: torch.Tensor, classes: torch.Tensor, temperature: float):
    """Each query's positives are the keys of the same class (its own region's key included)."""
    q = F.normalize(queries.float(), dim=1)
    k = F.normalize(keys.float(), dim=1)
    logits = q @ k.T / temperature
    positive = (classes[:, None] == classes[None, :]).float()
    log_prob = logits - torch.logsumexp(logits, dim=1, keepdim=True)
    return -(log_prob * positive).sum(1).div(positive.sum(1)).mean()


class SupCon(Objective):
    name = "supcon"

    def __init__(self, cfg: SupConConfig, num_classes: int, feature_channels: int) -> None:
        self.cfg = cfg
        self.num_classes = num_classes
        self.projector = _mlp(feature_channels, 256, 128)
        self.predictor = _mlp(128, 256, 128)
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
        ce = F.cross_entropy(out.logits[:n].float(), masks, ignore_index=IGNORE)
        feats = out.features
        with torch.no_grad():
            self.target.train()
            target_feats = self.target(torch.cat([v1, v2]), with_features=True).features
        contrastive = 0.0
        for (online, om), (target, tm) in (
            ((feats[n : 2 * n], m1), (target_feats[n:], m2)),
            ((feats[2 * n :], m2), (target_feats[:n], m1)),
        ):
            q_feat, q_ids = pool_by_mask(online, om, self.num_classes)
            k_feat, k_ids = pool_by_mask(target, tm, self.num_classes)
            # Only regions present in both views, in the same order.
            q_key = (q_ids[:, 0] * self.num_classes + q_ids[:, 1]).tolist()
            k_index = {int(key): i for i, key in enumerate((k_ids[:, 0] * self.num_classes + k_ids[:, 1]).tolist())}
            both = [i for i, key in enumerate(q_key) if key in k_index]
            if len(both) < 2:
                continue
            both = both[: n * self.cfg.num_masks]
            q = self.predictor(self.projector(q_feat[both].float()))
            with torch.no_grad():
                k = self.target_projector(k_feat[[k_index[q_key[i]] for i in both]].float())
            contrastive = contrastive + supervised_contrastive(q, k, q_ids[both, 1], self.cfg.temperature)
        total = ce + self.cfg.weight * contrastive
        return total, {
            "ce": ce.item(),
            "contrastive": float(contrastive.detach()) if torch.is_tensor(contrastive) else 0.0,
        }

    def after_step(self, model, step):
        if step.iteration % self.cfg.every == 0:
            ema_update(self.target, unwrap(model), self.cfg.ema_momentum)
            ema_update(self.target_projector, self.projector, self.cfg.ema_momentum)


class MeanTeacher(Objective):
    name = "mean_teacher"

    def __init__(self, cfg: MeanTeacherConfig, unlabeled_batches) -> None:
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
                pseudo[entropy > limit] = IGNORE
        strong = strong_augment(weak, step.generator(4))
        logits = model(torch.cat([images, strong])).logits.float()
        ce = F.cross_entropy(logits[:n], masks, ignore_index=IGNORE)
        unsup = F.cross_entropy(logits[n:], pseudo, ignore_index=IGNORE)  # mean over kept pixels
        return ce + self.cfg.weight * unsup, {"ce": ce.item(), "unsup": unsup.item(), "dropped": drop}

    def after_step(self, model, step):
        # Before the teacher starts, it simply follows the student.
        momentum = self.cfg.ema_momentum if step.epoch >= self.cfg.start_epoch else 0.0
        ema_update(self.teacher, unwrap(model), momentum)
