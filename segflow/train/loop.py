"""The one training loop: every kind of training in segflow is an objective plugged into it.

Supervised training, SupCon, Mean Teacher, DetCon pretraining and adversarial adaptation differ
only in what they optimise, and that is all an :class:`~segflow.train.objective.Objective`
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
:class:`~segflow.train.checkpoint.CheckpointSaver`, called from :func:`fit`. Its parts:
``distributed.py`` (processes, devices, precision), ``objective.py`` (the plug), ``checkpoint.py``
and this loop.
"""

from __future__ import annotations

import logging
import math
import os
import shutil
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, Sampler

from segflow.configs import differences, flatten
from segflow.errors import SegflowError
from segflow.models import FUNCTION_VERSION
from segflow.parallel import cpu_count
from segflow.progress import progress
from segflow.storage import exclusive
from segflow.train.checkpoint import CheckpointSaver, Diverged, weights_digest
from segflow.train.distributed import Dist, autocast_for, seed_everything
from segflow.train.objective import MAIN, Objective, Part, Recipe, Step

log = logging.getLogger(__name__)


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


def training_for(cfg, paths: tuple[str, ...] = (), fingerprints: dict | None = None, **parts) -> Training:
    """A :class:`Training` from a stage's config (a dataclass with ``loop()``, ``recipe()`` and
    ``RESUME_MAY_CHANGE``). Its identity, which a checkpoint must match to resume, is the config's
    settings without ``paths`` (where the data lies may change), plus the data's ``fingerprints``
    (what the data is may not). ``parts``: the rest of Training's fields (``loop`` overrides)."""
    identity = {k: v for k, v in flatten(cfg).items() if k not in paths} | (fingerprints or {})
    settings = {"loop": cfg.loop(), "recipe": cfg.recipe(), "identity": identity, "may_change": cfg.RESUME_MAY_CHANGE}
    return Training(**(settings | parts))


@dataclass
class LoopState:
    """Where a run stands. Saved in every checkpoint (as a dict), so a resume continues from it."""

    epoch: int = 0  # epochs done
    iteration: int = 0  # steps done
    best: float = -math.inf  # the best validation score so far
    best_epoch: int = -1
    bad_epochs: int = 0  # epochs since the best one
    history: list[dict] = field(default_factory=list)  # one record per epoch
    identity: dict[str, str] = field(default_factory=dict)  # the settings that made the run


@dataclass(frozen=True)
class Runtime:
    """What every step of a run shares: its length, device, precision and processes."""

    iters: int  # steps per epoch
    total: int  # steps in the run
    device: torch.device
    channels_last: bool
    autocast: Callable
    scaler: torch.amp.GradScaler | None
    dist: Dist


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
    net, objective, parts: list[Part], loader, streams: dict, state: LoopState, run: Training, env: Runtime
) -> dict:
    """One pass of ``iters`` steps; returns the epoch's mean losses and logs."""
    epoch, iters, total = state.epoch, env.iters, env.total
    waits = Waits()
    extra = {name: waits.timed(stream_loader) for name, stream_loader in streams.items()}
    net.train()
    objective.train()
    sums: dict[str, float] = {}
    started = time.perf_counter()
    for batch in waits.timed(progress(loader, iters, f"epoch {epoch + 1}/{run.loop.epochs}", every_s=60)):
        it = state.iteration
        for part in parts:
            part.set_lr(it, total)
        for name, stream in extra.items():
            batch[name] = next(stream)
        batch = _to_device(batch, env.device, env.channels_last)
        step = Step(epoch=epoch, iteration=it, seed=run.loop.seed, total=total)
        loss, logs = train_step(net, objective, parts, batch, step, env.autocast, env.scaler, env.dist)
        loss_value = loss.item()  # the step's one host sync, which the finiteness check shares
        if env.dist.any(not math.isfinite(loss_value)):
            raise Diverged(
                f"training diverged at step {it + 1} (epoch {epoch + 1}): the loss is {loss_value}. Nothing was "
                f"published. Lower the learning rate (--lr, now {parts[0].recipe.lr:g}), or check the data: a "
                "dataset whose every label is ignored (255) has no loss to learn from."
            )
        state.iteration = it + 1
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


def fit(run: Training, on_epoch: Callable[[int, dict], None] | None = None) -> dict:
    """Train ``run`` to the end (or an early stop), publish its best epoch; return the summary.
    A failed run leaves no empty checkpoint folder behind."""
    dist = Dist().start()
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

    state = LoopState()
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
        state = LoopState(**saver.restore(saved, model, parts, objective))
        log.info("resuming from %s after epoch %d", saver.last, state.epoch)
    elif loop.resume:
        log.info("no checkpoint in %s yet: starting from scratch", run.checkpoints)
    state.identity = identity
    env = Runtime(iters, total, device, channels_last, autocast, scaler, dist)

    def stopped_early() -> bool:  # with this run's settings, so a resume may relax them
        patience = loop.early_stop_patience
        return bool(patience) and state.epoch >= loop.early_stop_start and state.bad_epochs >= patience

    for epoch in range(state.epoch, loop.epochs):
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
            if part.plateau is not None and state.iteration > part.warmup(total):
                part.plateau.step(score)
        record.update({f"val_{k}": v for k, v in scores.items() if k != "score" and isinstance(v, float | int)})
        record.update({"lr": parts[0].lr, "epoch_seconds": time.monotonic() - started})
        if score > state.best + (loop.early_stop_min_delta if run.validate is not None else 0):
            state.best, state.best_epoch, state.bad_epochs = score, epoch, 0
            saver.save_best(model)
        else:
            state.bad_epochs += 1
        state.history.append({"epoch": epoch, **record})
        state.epoch = epoch + 1
        saver.save(model, parts, objective, asdict(state))
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
            log.info("early stop after epoch %d: no validation gain for %d epochs", epoch + 1, state.bad_epochs)

    summary = {
        "best_score": state.best if run.validate is not None else None,
        "best_epoch": state.best_epoch + 1,
        "epochs_run": state.epoch,
        "iterations": state.iteration,
        "history": state.history,
        "objective": objective.name,
    }
    log.info("rank %d: final weights %s", dist.rank, weights_digest(model))
    if dist.main:
        if state.best_epoch < 0 or not saver.best.exists():
            raise SegflowError(
                f"no epoch of this run had a finite validation score ({run.score}), so there is no best "
                f"epoch to publish; the checkpoints are in {saver.folder}. Check the validation data."
            )
        saver.load_best(model)
        if run.publish is not None:
            run.publish(model, summary)
    dist.barrier()
    return summary
