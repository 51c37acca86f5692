"""The plug of the engine: what one kind of training optimises (:class:`Objective`), the parameter
groups it trains with an optimiser and schedule each (:class:`Part`, :class:`Recipe`), its extra
data (:class:`Stream`) and the step it is called at (:class:`Step`)."""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.data import Dataset

from segflow.errors import SegflowError

MAIN = "model"  # the name of the model's own optimiser part


@dataclass(frozen=True)
class Recipe:
    """One optimiser and its learning-rate schedule."""

    optimizer: str = "adam"  # adam or sgd
    lr: float = 1e-3
    momentum: float = 0.9  # sgd
    betas: tuple[float, float] = (0.9, 0.999)  # adam
    weight_decay: float = 0.0
    warmup_iters: int = 0  # linear warmup from lr * warmup_ratio (at most a fifth of the run) ...
    warmup_ratio: float = 1 / 3
    plateau_patience: int = 0  # ... then x plateau_factor when the score stalls; 0: no plateau
    plateau_factor: float = 0.1
    min_lr: float = 1e-6
    poly_power: float = 0.0  # > 0: lr * (1 - iteration / total) ** power instead of a plateau
    clip_norm: float = 0.0  # L2 norm the gradients are clipped to; 0: no clipping


@dataclass(frozen=True)
class Step:
    epoch: int
    iteration: int  # global, from 0
    seed: int
    total: int = 1  # iterations in the whole run (ramps and decays)

    def generator(self, salt: int = 0) -> torch.Generator:
        """A CPU generator for this step: the same step always draws the same numbers."""
        return torch.Generator().manual_seed(hash((self.seed, self.epoch, self.iteration, salt)) & 0x7FFFFFFF)


@dataclass
class Stream:
    """A second source of batches beside the main data (unlabelled or target-domain images).
    It yields exactly one batch per step, reshuffled every epoch from (seed, epoch)."""

    dataset: Dataset
    batch_size: int


class Part:
    """Parameters trained by one optimiser with one schedule: the model (with the objective's
    heads), or a discriminator."""

    def __init__(self, name: str, params: list[nn.Parameter], recipe: Recipe) -> None:
        self.name, self.params, self.recipe = name, params, recipe
        if recipe.optimizer == "sgd":
            self.optimizer = torch.optim.SGD(
                params, lr=recipe.lr, momentum=recipe.momentum, weight_decay=recipe.weight_decay
            )
        elif recipe.optimizer == "adam":
            # The fused kernel where torch has one: Lite-HRNet's ~1,000 small tensors make a
            # per-parameter update loop a visible share of a CPU step (benchmarks/RESULTS.md, train throughput).
            fused = all(p.device.type in ("cpu", "cuda") for p in params)
            self.optimizer = torch.optim.Adam(
                params, lr=recipe.lr, betas=recipe.betas, weight_decay=recipe.weight_decay, fused=fused
            )
        else:
            raise SegflowError(f"optimizer {recipe.optimizer!r} is not known: choose adam or sgd.")
        self.plateau = None
        if recipe.plateau_patience:
            self.plateau = torch.optim.lr_scheduler.ReduceLROnPlateau(
                self.optimizer,
                mode="max",
                factor=recipe.plateau_factor,
                patience=recipe.plateau_patience,
                min_lr=recipe.min_lr,
            )

    def warmup(self, total: int) -> int:
        """Warmup steps: as configured, but at most a fifth of the run (short runs must get past it)."""
        return min(self.recipe.warmup_iters, max(1, total // 5)) if self.recipe.warmup_iters else 0

    def set_lr(self, iteration: int, total: int) -> None:
        """Warmup and poly decay set the rate each step; a plateau lowers it between epochs."""
        r = self.recipe
        warmup = self.warmup(total)
        if iteration < warmup:
            lr = r.lr * (r.warmup_ratio + (1 - r.warmup_ratio) * iteration / warmup)
        elif r.poly_power:
            lr = r.lr * (1 - iteration / max(total, 1)) ** r.poly_power
        elif iteration == warmup:
            lr = r.lr
        else:
            return
        for group in self.optimizer.param_groups:
            group["lr"] = lr

    @property
    def lr(self) -> float:
        return self.optimizer.param_groups[0]["lr"]

    def has_grads(self) -> bool:
        return any(p.grad is not None for p in self.params)

    def state_dict(self) -> dict:
        return {"optimizer": self.optimizer.state_dict(), "plateau": self.plateau.state_dict() if self.plateau else {}}

    def load_state_dict(self, state: dict) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        if self.plateau is not None:
            self.plateau.load_state_dict(state["plateau"])


def unwrap(model: nn.Module) -> nn.Module:
    """The model inside a DDP wrapper (or the model itself)."""
    return model.module if hasattr(model, "module") else model


def frozen_copy(module: nn.Module) -> nn.Module:
    """A copy that is not trained: an EMA teacher or target network starts as this."""
    return copy.deepcopy(unwrap(module)).requires_grad_(False)


@torch.no_grad()
def ema_update(target: nn.Module, source: nn.Module, momentum: float) -> None:
    """target = momentum * target + (1 - momentum) * source; buffers (BN statistics) copied."""
    for t, s in zip(target.parameters(), unwrap(source).parameters(), strict=True):
        t.mul_(momentum).add_(s.detach(), alpha=1 - momentum)
    for t, s in zip(target.buffers(), unwrap(source).buffers(), strict=True):
        t.copy_(s)


class Objective:
    """The plug of the engine. This base class is plain supervised training (cross-entropy,
    255 ignored); subclasses override what they need:

    - ``modules``: extra trainable modules (projection heads, discriminators), checkpointed;
      those not claimed by a part of their own are trained by the model's optimiser;
    - ``parts``: parts with their own optimiser and schedule (discriminators);
    - ``frozen``: copies that are not trained (EMA teachers, target networks), checkpointed;
    - ``streams``: extra data, one batch per step, put into the batch under the stream's name;
    - ``loss``: one loss for the model, or a dict of losses by part name, plus numbers to log;
    - ``after_step``: what follows an update (EMA).
    """

    name = "supervised"

    def setup(self, model: nn.Module, device: torch.device) -> None:
        """Called once the model is built and on its device, after seeding: build the extra
        modules here (so their initial weights follow the seed), make copies, move them."""
        for module in self.modules().values():
            module.to(device)

    def modules(self) -> dict[str, nn.Module]:
        return {}

    def parts(self) -> list[Part]:
        return []

    def frozen(self) -> dict[str, nn.Module]:
        return {}

    def streams(self) -> dict[str, Stream]:
        return {}

    def loss(self, net: nn.Module, batch: dict, step: Step) -> tuple[torch.Tensor | dict, dict[str, float]]:
        from segflow.data import IGNORE_INDEX

        logits = net(batch["image"]).logits
        ce = torch.nn.functional.cross_entropy(logits.float(), batch["mask"], ignore_index=IGNORE_INDEX)
        return ce, {"ce": ce.item()}

    def after_step(self, net: nn.Module, step: Step) -> None:
        pass

    # What the engine derives from the above.
    def external_params(self) -> list[nn.Parameter]:
        """Parameters of extra modules trained by the model's optimiser (outside DDP)."""
        claimed = {id(p) for part in self.parts() for p in part.params}
        return [p for m in self.modules().values() for p in m.parameters() if id(p) not in claimed]

    def train(self) -> None:
        for module in self.modules().values():
            module.train()

    def state_dict(self) -> dict:
        return {name: m.state_dict() for name, m in {**self.modules(), **self.frozen()}.items()}

    def load_state_dict(self, state: dict) -> None:
        for name, module in {**self.modules(), **self.frozen()}.items():
            module.load_state_dict(state[name])
