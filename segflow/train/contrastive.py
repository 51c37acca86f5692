"""Region-level contrastive learning, shared by DetCon pretraining and SupCon fine-tuning.

Features are mean-pooled under each mask region of two views. A region's prediction (online
network) must match its own region's projection in the other view (EMA target network) better
than every other region's. Which regions count as "its own" is the only difference:
- DetCon (pseudo masks): the same region id in the same image;
- SupCon (label maps): every region of the same class, in any image.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from segflow.train.objective import Objective, ema_update, frozen_copy


def mlp(cin: int, hidden: int, cout: int) -> nn.Sequential:
    """Projector / predictor: Linear -> BN -> ReLU -> Linear."""
    return nn.Sequential(nn.Linear(cin, hidden), nn.BatchNorm1d(hidden), nn.ReLU(inplace=True), nn.Linear(hidden, cout))


def pool_by_mask(features: torch.Tensor, masks: torch.Tensor, num_ids: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean feature of every (image, id) region present. Returns (R x C, R x 2 [image, id]).

    Masks are brought to the feature resolution by nearest sampling; ids >= ``num_ids`` (255,
    ignore) pool nothing.
    """
    _, _, h, w = features.shape
    small = F.interpolate(masks[:, None].float(), size=(h, w), mode="nearest")[:, 0].long()
    onehot = F.one_hot(small.clamp(max=num_ids), num_ids + 1)[..., :num_ids]
    onehot = onehot.permute(0, 3, 1, 2).to(features.dtype)  # N x K x h x w
    area = onehot.sum((2, 3))
    pooled = torch.einsum("nchw,nkhw->nkc", features, onehot) / area.clamp(min=1)[..., None]
    keep = area > 0
    return pooled[keep], keep.nonzero()


def matched_regions(
    ids_a: torch.Tensor, ids_b: torch.Tensor, per_image: int, generator: torch.Generator
) -> tuple[list[int], list[int]]:
    """Row indices of regions present in both views, at most ``per_image`` per image (sampled)."""
    index_b = {(int(i), int(k)): row for row, (i, k) in enumerate(ids_b.tolist())}
    by_image: dict[int, list[tuple[int, int]]] = {}
    for row, (i, k) in enumerate(ids_a.tolist()):
        if (i, k) in index_b:
            by_image.setdefault(i, []).append((row, index_b[(i, k)]))
    rows_a, rows_b = [], []
    for pairs in by_image.values():
        if len(pairs) > per_image:
            pick = torch.randperm(len(pairs), generator=generator)[:per_image].tolist()
            pairs = [pairs[p] for p in sorted(pick)]
        rows_a += [a for a, _ in pairs]
        rows_b += [b for _, b in pairs]
    return rows_a, rows_b


def contrastive(queries: torch.Tensor, keys: torch.Tensor, groups: torch.Tensor, temperature: float) -> torch.Tensor:
    """InfoNCE with several positives: query i's positives are the keys whose group equals its own."""
    q = F.normalize(queries.float(), dim=1)
    k = F.normalize(keys.float(), dim=1)
    logits = q @ k.T / temperature
    positive = (groups[:, None] == groups[None, :]).float()
    log_prob = logits - torch.logsumexp(logits, dim=1, keepdim=True)
    return -(log_prob * positive).sum(1).div(positive.sum(1)).mean()


def region_loss(
    online: tuple[torch.Tensor, torch.Tensor],
    target: tuple[torch.Tensor, torch.Tensor],
    num_ids: int,
    heads: tuple[nn.Module, nn.Module, nn.Module],
    temperature: float,
    per_image: int,
    by_class: bool,
    generator: torch.Generator,
) -> torch.Tensor:
    """Loss of one direction (online view A -> target view B).

    ``online`` / ``target``: (features N x C x h x w, masks N x H x W). ``heads``: (projector,
    predictor, target projector). ``by_class``: regions with the same id in other images are
    positives too (SupCon); otherwise only the same region (DetCon).
    """
    projector, predictor, target_projector = heads
    feat_a, ids_a = pool_by_mask(online[0], online[1], num_ids)
    feat_b, ids_b = pool_by_mask(target[0], target[1], num_ids)
    rows_a, rows_b = matched_regions(ids_a, ids_b, per_image, generator)
    if len(rows_a) < 2:
        return online[0].sum() * 0.0  # nothing to contrast in this batch: a zero that keeps the graph
    q = predictor(projector(feat_a[rows_a].float()))
    with torch.no_grad():
        k = target_projector(feat_b[rows_b].float())
    ids = ids_a[rows_a]
    groups = ids[:, 1] if by_class else ids[:, 0] * num_ids + ids[:, 1]
    return contrastive(q, k, groups, temperature)


class ContrastBranch:
    """DetCon-B's branch, which DetCon and SupCon both train: an online projector and predictor
    beside the network, EMA copies of the network and projector as targets, and the symmetric
    region loss between two views. ``by_class``: SupCon's positives (same class anywhere)."""

    def __init__(self, channels: int, temperature: float, num_masks: int, momentum: float, by_class: bool) -> None:
        self.channels, self.temperature, self.num_masks = channels, temperature, num_masks
        self.momentum, self.by_class = momentum, by_class

    def build(self, model: nn.Module) -> None:
        """Heads and targets; called from an objective's setup, after the engine seeded."""
        self.projector = mlp(self.channels, 256, 128)
        self.predictor = mlp(128, 256, 128)
        self.target = frozen_copy(model)
        self.target_projector = frozen_copy(self.projector)

    def modules(self) -> dict[str, nn.Module]:
        return {"projector": self.projector, "predictor": self.predictor}

    def frozen(self) -> dict[str, nn.Module]:
        return {"target": self.target, "target_projector": self.target_projector}

    def loss(
        self,
        online: tuple[torch.Tensor, torch.Tensor],
        target: tuple[torch.Tensor, torch.Tensor],
        masks: tuple[torch.Tensor, torch.Tensor],
        num_ids: int,
        generator: torch.Generator,
    ) -> torch.Tensor:
        """Both directions: view 1 online against view 2 target, and view 2 against view 1."""
        (o1, o2), (t1, t2), (m1, m2) = online, target, masks
        heads = (self.projector, self.predictor, self.target_projector)
        args = (num_ids, heads, self.temperature, self.num_masks, self.by_class, generator)
        return region_loss((o1, m1), (t2, m2), *args) + region_loss((o2, m2), (t1, m1), *args)

    def update(self, net: nn.Module) -> None:
        ema_update(self.target, net, self.momentum)
        ema_update(self.target_projector, self.projector, self.momentum)


class ContrastObjective(Objective):
    """An objective that trains a :class:`ContrastBranch` beside the network (DetCon, SupCon)."""

    branch: ContrastBranch

    def modules(self) -> dict[str, nn.Module]:
        return self.branch.modules()

    def frozen(self) -> dict[str, nn.Module]:
        return self.branch.frozen()

    def setup(self, model: nn.Module, device: torch.device) -> None:
        self.branch.build(model)  # here, after the engine seeded
        super().setup(model, device)

    def after_step(self, net: nn.Module, step) -> None:
        self.branch.update(net)
