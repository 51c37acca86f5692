"""The one training loop: every kind of training in segflow is an objective plugged into it.

Supervised training, SupCon, Mean Teacher, DetCon pretraining and adversarial adaptation differ
only in what they optimise, and that is all an :class:`~segflow.train.objectives.Objective`
says: its loss, extra data streams, extra modules (trained with the model's optimiser), extra
parts with optimisers of their own (discriminators), frozen or EMA copies, and their state.

The engine owns everything else, once, for all of them:
- seeding, devices, mixed precision (AMP) and channels-last on CUDA;
- DDP under ``torchrun`` (gradients of modules outside DDP are averaged too; one process writes);
- the optimiser schedules (warmup, then plateau on the validation score, or poly decay);
- a checkpoint after every epoch, written atomically, that lets a killed run resume to the same
  result, and refuses to resume a run made with other settings;
- validation, early stopping, choosing the best epoch, and publishing it;
- progress on a terminal and plain log lines elsewhere; per-epoch records for MLflow.

Shaped after timm's ``train.py``: :func:`train_one_epoch`, :func:`validate`, and a
:class:`CheckpointSaver`, called from :func:`fit`.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import logging
import math
import os
import random
import shutil
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, Sampler

from segflow.configs import differences
from segflow.errors import SegflowError
from segflow.models import FUNCTION_VERSION
from segflow.models import artifact as model_artifact
from segflow.parallel import cpu_count
from segflow.progress import progress
from segflow.storage import exclusive, writing

log = logging.getLogger(__name__)
CHECKPOINT = "last.pt"
BEST = "best.safetensors"
MAIN = "model"  # the name of the model's own optimiser part


# --- settings -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class LoopConfig:
    """How long and how the loop runs; the same for every objective."""

    epochs: int
    batch_size: int
    seed: int = 0
    iters_per_epoch: int = 0  # at least this many steps per epoch; 0: one pass over the main data
    exact_iters: bool = False  # iters_per_epoch exactly, however long the data (adaptation's snapshots)
    amp: str = "auto"  # auto: bf16 (or fp16) on CUDA, off on CPU; or off / bf16 / fp16
    channels_last: str = "auto"  # auto: on for CUDA
    loader_workers: int = -1  # -1: auto (see loader_workers)
    early_stop_patience: int = 0  # epochs without a validation gain before stopping; 0: never
    early_stop_min_delta: float = 0.001
    early_stop_start: int = 3  # no early stop before this epoch
    resume: bool = False
    overwrite: bool = False


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


# --- processes and devices ----------------------------------------------------------------------


class Dist:
    """Where this process stands in a torchrun launch (a world of 1 otherwise)."""

    def __init__(self) -> None:
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        if torch.cuda.is_available():
            self.device = torch.device("cuda", self.local_rank)
            torch.cuda.set_device(self.device)
        else:
            self.device = torch.device("cpu")
        if self.world > 1 and not torch.distributed.is_initialized():
            torch.distributed.init_process_group("nccl" if self.device.type == "cuda" else "gloo")

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world > 1:
            torch.distributed.barrier()

    def sync_buffers(self, modules: list[nn.Module]) -> None:
        """Rank 0's buffers (BatchNorm statistics) everywhere. Each process updates them from its
        own batches; validation and the published weights must see one set, or the processes'
        scores, schedules and best epochs would drift apart."""
        if self.world == 1:
            return
        for module in modules:
            for buffer in module.buffers():
                torch.distributed.broadcast(buffer, src=0)

    def any(self, flag: bool) -> bool:
        """Whether ``flag`` is true in any process (every process gets the same answer)."""
        if self.world == 1:
            return flag
        value = torch.tensor([float(flag)], device=self.device)
        torch.distributed.all_reduce(value)
        return bool(value.item())

    def average_grads(self, params: list[nn.Parameter]) -> None:
        """Gradients of parameters outside DDP (heads, discriminators) averaged over processes."""
        if self.world == 1:
            return
        for p in params:
            if p.grad is not None:
                torch.distributed.all_reduce(p.grad)
                p.grad /= self.world


def is_main_process() -> bool:
    """Rank 0 of a torchrun launch, or a plain process: the one that writes and tracks."""
    return int(os.environ.get("RANK", "0")) == 0


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def autocast_for(amp: str, device: torch.device):
    """(context factory, GradScaler or None) for the configured mixed precision."""
    mode = amp
    if mode == "auto":
        mode = ("bf16" if torch.cuda.is_bf16_supported() else "fp16") if device.type == "cuda" else "off"
    if mode == "off":
        return nullcontext, None
    dtype = torch.bfloat16 if mode == "bf16" else torch.float16
    scaler = torch.amp.GradScaler(device.type) if mode == "fp16" and device.type == "cuda" else None
    return (lambda: torch.autocast(device.type, dtype=dtype)), scaler


# --- steps, data streams, parts -----------------------------------------------------------------


@dataclass(frozen=True)
class Step:
    epoch: int
    iteration: int  # global, from 0
    seed: int
    total: int = 1  # iterations in the whole run (ramps and decays)

    def generator(self, salt: int = 0) -> torch.Generator:
        """A CPU generator for this step: the same step always draws the same numbers."""
        return torch.Generator().manual_seed(hash((self.seed, self.epoch, self.iteration, salt)) & 0x7FFFFFFF)


class EpochSampler(Sampler[int]):
    """Shuffled indices for one epoch: exactly ``iters`` batches (cycling through the data as
    often as needed), split across processes. Drawn from (seed, epoch): the same with or
    without a resume."""

    def __init__(self, n: int, batch_size: int, iters: int, seed: int, dist: Dist) -> None:
        self.n, self.batch_size, self.iters, self.seed, self.dist = n, batch_size, iters, seed, dist
        self.epoch = 0

    def __iter__(self) -> Iterator[int]:
        g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        need = self.iters * self.batch_size * self.dist.world
        order: list[int] = []
        while len(order) < need:
            order += torch.randperm(self.n, generator=g).tolist()
        return iter(order[:need][self.dist.rank :: self.dist.world])

    def __len__(self) -> int:
        return self.iters * self.batch_size


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
            # per-parameter update loop a visible share of a CPU step (about 8%).
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


# --- the objective: what one kind of training optimises -----------------------------------------


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


# --- what a run is ------------------------------------------------------------------------------


@dataclass
class Training:
    """Everything :func:`fit` needs for one kind of training.

    ``build_model`` is called after seeding, so initial weights follow the seed. ``validate``
    scores a model (a dict holding ``score``); without it the last epoch is the best one.
    ``publish(model, summary)`` writes the output artifact; it runs in one process only, with
    the best epoch's weights loaded. ``identity``: the settings and data fingerprints that make
    this run this run; a checkpoint made with other ones is not resumed.
    """

    build_model: Callable[[], nn.Module]
    objective: Objective
    data: Dataset
    loop: LoopConfig
    recipe: Recipe
    checkpoints: Path
    identity: dict[str, str] = field(default_factory=dict)
    may_change: tuple[str, ...] = ()
    validate: Callable[[nn.Module], dict] | None = None
    score: str = "mDice"
    publish: Callable[[nn.Module, dict], None] | None = None


# --- checkpoints --------------------------------------------------------------------------------


class Diverged(SegflowError):
    """A non-finite loss: the run stops at once, publishes nothing and removes its checkpoints
    (resuming would diverge again, and a lower --lr is another run)."""


@contextlib.contextmanager
def _removed_on_failure(path: Path) -> Iterator[None]:
    try:
        yield
    except BaseException:
        path.unlink(missing_ok=True)
        raise


class CheckpointSaver:
    """``last.pt`` after every epoch (model, every part's optimiser and schedule, the objective's
    state, the loop's state) and ``best.safetensors`` when the score improves; both atomically."""

    def __init__(self, folder: Path, dist: Dist) -> None:
        self.folder = Path(folder)
        self.dist = dist
        self.last = self.folder / CHECKPOINT
        self.best = self.folder / BEST

    def save(self, model: nn.Module, parts: list[Part], objective, state: dict) -> None:
        if not self.dist.main:
            return
        self.folder.mkdir(parents=True, exist_ok=True)
        tmp = self.last.with_suffix(".tmp")
        with writing(self.last), _removed_on_failure(tmp):
            torch.save(
                {
                    "model": model.state_dict(),
                    "parts": {p.name: p.state_dict() for p in parts},
                    "objective": objective.state_dict(),
                    "state": state,
                },
                tmp,
            )
            os.replace(tmp, self.last)

    def save_best(self, model: nn.Module) -> None:
        if not self.dist.main:
            return
        self.folder.mkdir(parents=True, exist_ok=True)
        tmp = self.best.with_suffix(".tmp")
        with writing(self.best), _removed_on_failure(tmp):
            model_artifact.save_weights(tmp, model.state_dict(), "segflow.checkpoint/1")
            os.replace(tmp, self.best)

    def remove_if_empty(self) -> None:
        """After a failed run: a checkpoint folder with nothing to resume from goes."""
        if self.dist.main:
            with contextlib.suppress(OSError):
                self.folder.rmdir()  # only when empty

    def read(self) -> dict:
        try:
            return torch.load(self.last, map_location="cpu", weights_only=True)
        except Exception as exc:  # truncated or foreign file: torch raises several types
            raise SegflowError(
                f"{self.last} cannot be read ({type(exc).__name__}: {str(exc)[:200]}): to start over, run "
                "again without --resume and with --overwrite."
            ) from None

    def restore(self, saved: dict, model: nn.Module, parts: list[Part], objective) -> dict:
        try:
            model.load_state_dict(saved["model"])
            for part in parts:
                part.load_state_dict(saved["parts"][part.name])
            objective.load_state_dict(saved["objective"])
        except (RuntimeError, KeyError, ValueError) as exc:
            raise SegflowError(
                f"{self.last} does not match this run ({type(exc).__name__}: {str(exc)[:300]}): resume with the "
                "same model and method, or pass --overwrite to start over."
            ) from None
        return saved["state"]

    def load_best(self, model: nn.Module) -> None:
        from safetensors.torch import load_file

        try:
            model.load_state_dict(load_file(str(self.best)))
        except Exception as exc:  # truncated or foreign: safetensors and torch raise several types
            raise SegflowError(
                f"{self.best} cannot be read ({type(exc).__name__}: {str(exc)[:200]}): to start over, run "
                "again without --resume and with --overwrite."
            ) from None


# --- the loop -----------------------------------------------------------------------------------


def _to_device(batch, device: torch.device, channels_last: bool):
    if isinstance(batch, dict):
        return {k: _to_device(v, device, channels_last and k != "mask") for k, v in batch.items()}
    if torch.is_tensor(batch):
        batch = batch.to(device, non_blocking=True)
        if channels_last and batch.ndim == 4:
            batch = batch.contiguous(memory_format=torch.channels_last)
    return batch


def train_step(net, objective, parts: list[Part], batch: dict, step: Step, autocast, scaler, dist: Dist):
    """One optimisation step: the objective's loss(es), backward, gradient sync and clipping, an
    update of every part, then the objective's after-step hook (EMA)."""
    with autocast():
        losses, logs = objective.loss(net, batch, step)
    if torch.is_tensor(losses):
        losses = {MAIN: losses}
    for part in parts:
        part.optimizer.zero_grad(set_to_none=True)
    for loss in losses.values():  # the model's first; a discriminator's loss sees detached outputs
        (scaler.scale(loss) if scaler is not None else loss).backward()
    # DDP averages the model's gradients; the rest (heads, discriminators) are averaged here.
    dist.average_grads([p for part in parts for p in part.params if part.name != MAIN])
    dist.average_grads(objective.external_params())
    for part in parts:
        if not part.has_grads():
            continue
        if scaler is not None:
            scaler.unscale_(part.optimizer)
        if part.recipe.clip_norm:
            torch.nn.utils.clip_grad_norm_(part.params, part.recipe.clip_norm)
        if scaler is not None:
            scaler.step(part.optimizer)
        else:
            part.optimizer.step()
    if scaler is not None:
        scaler.update()
    objective.after_step(net, step)
    total = sum(losses.values())
    return total, logs


def train_one_epoch(
    net, objective, parts: list[Part], loader, streams: dict, state: dict, run: Training, env: dict
) -> dict:
    """One pass of ``iters`` steps; returns the epoch's mean losses and logs."""
    epoch, iters, total = state["epoch"], env["iters"], env["total"]
    waits = Waits()
    extra = {name: waits.timed(stream_loader) for name, stream_loader in streams.items()}
    net.train()
    objective.train()
    sums: dict[str, float] = {}
    started = time.perf_counter()
    for batch in waits.timed(progress(loader, iters, f"epoch {epoch + 1}/{run.loop.epochs}", every_s=60)):
        it = state["iteration"]
        for part in parts:
            part.set_lr(it, total)
        for name, stream in extra.items():
            batch[name] = next(stream)
        batch = _to_device(batch, env["device"], env["channels_last"])
        step = Step(epoch=epoch, iteration=it, seed=run.loop.seed, total=total)
        loss, logs = train_step(net, objective, parts, batch, step, env["autocast"], env["scaler"], env["dist"])
        loss_value = loss.item()  # the step's one host sync, which the finiteness check shares
        if env["dist"].any(not math.isfinite(loss_value)):
            raise Diverged(
                f"training diverged at step {it + 1} (epoch {epoch + 1}): the loss is {loss_value}. Nothing was "
                f"published. Lower the learning rate (--lr, now {parts[0].recipe.lr:g}), or check the data: a "
                "dataset whose every label is ignored (255) has no loss to learn from."
            )
        state["iteration"] = it + 1
        for key, value in {"loss": loss_value, **logs}.items():
            sums[key] = sums.get(key, 0.0) + float(value)
    seconds = time.perf_counter() - started
    means = {f"train_{k}": v / iters for k, v in sums.items()}
    return means | {"data_wait_seconds": waits.seconds, "data_wait_share": waits.seconds / max(seconds, 1e-9)}


class Waits:
    """The seconds a loop spent waiting for its next batch: reading and augmenting in this process
    (no loader workers), or what the workers had not prepared in time."""

    def __init__(self) -> None:
        self.seconds = 0.0

    def timed(self, items: Iterable) -> Iterator:
        items = iter(items)
        while True:
            start = time.perf_counter()
            try:
                item = next(items)
            except StopIteration:
                return
            self.seconds += time.perf_counter() - start
            yield item


def validate(model: nn.Module, run: Training) -> dict:
    """The validation scores of ``model`` (eval mode for the call, then back)."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            return run.validate(model)
    finally:
        model.train(was_training)


def loader_workers(requested: int, device: torch.device, processes: int = 1) -> int:
    """Worker processes reading and augmenting batches. -1 (auto): none on CPU, where the cores
    already run the model and a worker would take them from it; beside an accelerator, this
    process's share of the cores less one for the loop, at most 4."""
    if requested < -1:
        raise SegflowError(f"--loader-workers must be -1 (auto), 0 (none) or more (got {requested}).")
    if requested >= 0:
        return requested
    if device.type == "cpu":
        return 0
    return max(0, min(4, cpu_count() // max(1, processes) - 1))


def _loader(dataset: Dataset, batch_size: int, iters: int, seed: int, dist: Dist, workers: int):
    sampler = EpochSampler(len(dataset), batch_size, iters, seed, dist)
    loader = DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        drop_last=True,
        num_workers=workers,
        pin_memory=dist.device.type == "cuda",  # page-locked batches copy to the device asynchronously
    )
    return loader, sampler


def _set_epoch(epoch: int, *items) -> None:
    for item in items:
        if hasattr(item, "epoch"):
            item.epoch = epoch


def weights_digest(model: nn.Module) -> str:
    digest = hashlib.sha256()
    for key, value in sorted(model.state_dict().items()):
        digest.update(key.encode())
        digest.update(value.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


def fit(run: Training, on_epoch: Callable[[int, dict], None] | None = None) -> dict:
    """Train ``run`` to the end (or an early stop), publish its best epoch; return the summary.
    A failed run leaves no empty checkpoint folder behind."""
    dist = Dist()
    saver = CheckpointSaver(run.checkpoints, dist)
    with exclusive(run.checkpoints) if dist.main else nullcontext():
        try:
            return _fit(run, dist, saver, on_epoch)
        except BaseException:
            saver.remove_if_empty()
            raise


def _fit(run: Training, dist: Dist, saver: CheckpointSaver, on_epoch: Callable[[int, dict], None] | None) -> dict:
    device = dist.device
    loop = run.loop
    if dist.main and not loop.resume and saver.last.exists() and not loop.overwrite:
        raise SegflowError(
            f"{saver.last} exists from an earlier run: pass --resume to continue it, or --overwrite to start over."
        )
    seed_everything(loop.seed)
    model = run.build_model().to(device)
    channels_last = loop.channels_last == "on" or (loop.channels_last == "auto" and device.type == "cuda")
    if channels_last:
        model.to(memory_format=torch.channels_last)
    objective = run.objective
    objective.setup(model, device)
    net = model
    if dist.world > 1:
        net = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    parts = [Part(MAIN, list(model.parameters()) + objective.external_params(), run.recipe)]
    parts += objective.parts()
    autocast, scaler = autocast_for(loop.amp, device)

    iters = max(len(run.data) // (loop.batch_size * dist.world), 1, loop.iters_per_epoch)
    if loop.exact_iters and loop.iters_per_epoch:
        iters = loop.iters_per_epoch
    total = iters * loop.epochs
    workers = loader_workers(loop.loader_workers, device, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    loader, sampler = _loader(run.data, loop.batch_size, iters, loop.seed, dist, workers)
    streams = {
        name: _loader(s.dataset, s.batch_size, iters, loop.seed + k + 1, dist, workers)
        for k, (name, s) in enumerate(objective.streams().items())
    }
    if len(run.data) < loop.batch_size:
        log.warning("only %d training items for batch size %d: items repeat in a batch", len(run.data), loop.batch_size)

    state = {"epoch": 0, "iteration": 0, "best": -float("inf"), "best_epoch": -1, "bad_epochs": 0, "history": []}
    # A checkpoint of another model function must not resume into this one.
    identity = {**run.identity, "model_function": str(FUNCTION_VERSION)}
    if loop.resume and saver.last.exists():
        saved = saver.read()
        changed = differences(saved["state"].get("identity", {}), identity, run.may_change)
        if changed:
            raise SegflowError(
                f"--resume: {saver.last} was made with other settings; resume with the same ones (only "
                f"{', '.join(run.may_change)} may change), or pass --overwrite to start over:",
                problems=changed,
            )
        state = saver.restore(saved, model, parts, objective)
        log.info("resuming from %s after epoch %d", saver.last, state["epoch"])
    elif loop.resume:
        log.info("no checkpoint in %s yet: starting from scratch", run.checkpoints)
    state["identity"] = identity
    env = {
        "iters": iters,
        "total": total,
        "device": device,
        "channels_last": channels_last,
        "autocast": autocast,
        "scaler": scaler,
        "dist": dist,
    }

    def stopped_early() -> bool:  # with this run's settings, so a resume may relax them
        patience = loop.early_stop_patience
        return bool(patience) and state["epoch"] >= loop.early_stop_start and state["bad_epochs"] >= patience

    for epoch in range(state["epoch"], loop.epochs):
        if stopped_early():
            break
        started = time.monotonic()
        _set_epoch(epoch, run.data, sampler, *[s.dataset for s in objective.streams().values()])
        for _, stream_sampler in streams.values():
            stream_sampler.epoch = epoch
        try:
            record = train_one_epoch(
                net, objective, parts, loader, {k: v[0] for k, v in streams.items()}, state, run, env
            )
        except Diverged:
            if dist.main:
                shutil.rmtree(saver.folder, ignore_errors=True)
            raise
        dist.sync_buffers([model, *objective.modules().values(), *objective.frozen().values()])
        scores = validate(model, run) if run.validate is not None else {}
        score = scores.get("score", float(epoch))  # without validation, the latest epoch is the best
        for part in parts:
            if part.plateau is not None and state["iteration"] > part.warmup(total):
                part.plateau.step(score)
        record.update({f"val_{k}": v for k, v in scores.items() if k != "score" and isinstance(v, float | int)})
        record.update({"lr": parts[0].lr, "epoch_seconds": time.monotonic() - started})
        if score > state["best"] + (loop.early_stop_min_delta if run.validate is not None else 0):
            state.update(best=score, best_epoch=epoch, bad_epochs=0)
            saver.save_best(model)
        else:
            state["bad_epochs"] += 1
        state["history"].append({"epoch": epoch, **record})
        state["epoch"] = epoch + 1
        saver.save(model, parts, objective, state)
        if dist.main:
            shown = f" val {run.score} {scores['score']:.4f}" if scores else ""
            log.info(
                "epoch %d/%d loss %.4f%s lr %.2e (%.1fs)",
                epoch + 1,
                loop.epochs,
                record.get("train_loss", float("nan")),
                shown,
                record["lr"],
                record["epoch_seconds"],
            )
            if on_epoch is not None:
                on_epoch(epoch, record)
        if stopped_early():
            log.info("early stop after epoch %d: no validation gain for %d epochs", epoch + 1, state["bad_epochs"])

    summary = {
        "best_score": state["best"] if run.validate is not None else None,
        "best_epoch": state["best_epoch"] + 1,
        "epochs_run": state["epoch"],
        "iterations": state["iteration"],
        "history": state["history"],
        "objective": objective.name,
    }
    log.info("rank %d: final weights %s", dist.rank, weights_digest(model))
    if dist.main:
        if state["best_epoch"] < 0 or not saver.best.exists():
            raise SegflowError(
                f"no epoch of this run had a finite validation score ({run.score}), so there is no best "
                f"epoch to publish; the checkpoints are in {saver.folder}. Check the validation data."
            )
        saver.load_best(model)
        if run.publish is not None:
            run.publish(model, summary)
    dist.barrier()
    return summary
