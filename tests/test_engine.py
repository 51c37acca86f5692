"""The engine's parts on their own, in milliseconds: schedules (warm-up cap, poly, plateau), the
epoch sampler, and the checkpoint saver. Training end to end is in tests/test_train.py."""

from __future__ import annotations

import itertools
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from segflow.errors import SegflowError
from segflow.train.checkpoint import CheckpointSaver
from segflow.train.loop import EpochSampler
from segflow.train.objective import Objective, Part, Recipe


def part(**recipe) -> Part:
    return Part("model", list(nn.Linear(2, 2).parameters()), Recipe(**recipe))


def lrs(p: Part, total: int) -> list[float]:
    rates = []
    for iteration in range(total):
        p.set_lr(iteration, total)
        rates.append(p.lr)
    return rates


def test_warmup_is_capped_at_a_fifth_of_the_run():
    assert part(warmup_iters=100).warmup(1000) == 100
    assert part(warmup_iters=100).warmup(50) == 10  # a short run gets past its warm-up
    assert part(warmup_iters=100).warmup(3) == 1
    assert part().warmup(1000) == 0


def test_linear_warmup_then_constant():
    rates = lrs(part(lr=0.3, warmup_iters=4, warmup_ratio=0.5), total=100)
    assert rates[:5] == pytest.approx([0.15, 0.1875, 0.225, 0.2625, 0.3])
    assert rates[4:] == pytest.approx([0.3] * 96)


def test_poly_decay_after_warmup():
    rates = lrs(part(lr=1.0, warmup_iters=2, warmup_ratio=0.0, poly_power=0.9), total=10)
    assert rates[:2] == pytest.approx([0.0, 0.5])
    assert rates[2:] == pytest.approx([(1 - i / 10) ** 0.9 for i in range(2, 10)])
    assert all(a > b for a, b in itertools.pairwise(rates[2:]))


def test_plateau_lowers_the_rate_when_the_score_stalls_down_to_min_lr():
    p = part(lr=1e-3, plateau_patience=1, plateau_factor=0.1, min_lr=5e-6)
    for score in (0.5, 0.6, 0.6, 0.6):  # better, then two stalls: one cut after patience 1
        p.plateau.step(score)
    assert p.lr == pytest.approx(1e-4)
    for _ in range(10):
        p.plateau.step(0.6)
    assert p.lr == pytest.approx(5e-6)
    p.set_lr(50, 100)  # no warm-up, no poly: a step leaves the plateau's rate alone
    assert p.lr == pytest.approx(5e-6)


def one_process(rank: int = 0, world: int = 1):
    return SimpleNamespace(rank=rank, world=world, main=rank == 0)


def test_sampler_draws_exactly_its_batches_the_same_for_a_seed_and_epoch():
    sampler = EpochSampler(n=5, batch_size=4, iters=3, seed=7, dist=one_process())
    first = list(sampler)
    assert len(first) == len(sampler) == 12 and set(first) == set(range(5))  # cycles through 5 items
    assert sorted(first[:5]) == sorted(first[5:10]) == list(range(5))  # whole shuffled passes, one after another
    assert list(sampler) == first  # a resume redraws the same epoch
    sampler.epoch = 1
    assert list(sampler) != first
    assert list(EpochSampler(5, 4, 3, 8, one_process())) != first


def test_sampler_splits_one_order_across_processes():
    whole = EpochSampler(n=10, batch_size=2, iters=4, seed=1, dist=one_process(world=1))
    ranks = [list(EpochSampler(10, 2, 4, 1, one_process(r, 2))) for r in (0, 1)]
    together = torch.Generator().manual_seed(1 * 100_003)  # the order both processes draw
    order = []
    while len(order) < 16:
        order += torch.randperm(10, generator=together).tolist()
    assert ranks[0] == order[:16][0::2] and ranks[1] == order[:16][1::2]
    assert len(ranks[0]) == len(ranks[1]) == 8 and len(list(whole)) == 8


def trained(seed: int = 0) -> tuple[nn.Module, Part]:
    torch.manual_seed(seed)
    model = nn.Linear(3, 2)
    p = Part("model", list(model.parameters()), Recipe(lr=0.1))
    model(torch.randn(4, 3)).sum().backward()
    p.optimizer.step()
    return model, p


def test_checkpoint_round_trip_restores_model_optimiser_and_loop_state(tmp_path):
    saver = CheckpointSaver(tmp_path / "ckpt", one_process())
    model, p = trained()
    saver.save(model, [p], Objective(), {"epoch": 3, "best": 0.7})
    saver.save_best(model)
    fresh, fresh_part = trained(seed=1)
    state = saver.restore(saver.read(), fresh, [fresh_part], Objective())
    assert state == {"epoch": 3, "best": 0.7}
    assert torch.equal(fresh.weight, model.weight)
    assert fresh_part.optimizer.state_dict()["state"][0]["step"] == 1
    other = nn.Linear(3, 2)
    saver.load_best(other)
    assert torch.equal(other.bias, model.bias)
    assert sorted(f.name for f in saver.folder.iterdir()) == ["best.safetensors", "last.pt"]  # no temporaries


def test_checkpoint_errors_say_what_to_do(tmp_path):
    saver = CheckpointSaver(tmp_path / "ckpt", one_process())
    model, p = trained()
    saver.save(model, [p], Objective(), {"epoch": 1})
    with pytest.raises(SegflowError, match="does not match this run"):
        saver.restore(saver.read(), nn.Linear(5, 2), [p], Objective())
    saver.last.write_bytes(saver.last.read_bytes()[:100])  # truncated
    with pytest.raises(SegflowError, match=r"cannot be read.*--overwrite"):
        saver.read()
    saver.remove_if_empty()
    assert saver.folder.exists()  # not empty: kept
    empty = CheckpointSaver(tmp_path / "empty", one_process())
    empty.folder.mkdir()
    empty.remove_if_empty()
    assert not empty.folder.exists()
    CheckpointSaver(tmp_path / "rank1", one_process(rank=1)).save(model, [p], Objective(), {})
    assert not (tmp_path / "rank1").exists()  # only the main process writes


def test_loader_workers_auto_is_none_on_cpu_and_the_spare_cores_beside_a_gpu(monkeypatch):
    from segflow.train import loop

    monkeypatch.setattr(loop, "cpu_count", lambda: 16)
    cpu, gpu = torch.device("cpu"), torch.device("cuda", 0)
    assert loop.loader_workers(-1, cpu) == 0  # the cores run the model
    assert loop.loader_workers(-1, gpu) == 4 and loop.loader_workers(-1, gpu, processes=8) == 1
    monkeypatch.setattr(loop, "cpu_count", lambda: 1)
    assert loop.loader_workers(-1, gpu) == 0
    assert loop.loader_workers(3, cpu) == 3 and loop.loader_workers(0, gpu) == 0  # asked for: kept
    with pytest.raises(SegflowError, match="--loader-workers must be -1"):
        loop.loader_workers(-2, cpu)


def test_reading_the_launch_changes_nothing(monkeypatch):
    """Dist() only reads torchrun's variables; start() joins the launch (here: a world of 1)."""
    from segflow.train.distributed import Dist

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    dist = Dist()
    assert dist.world == 2 and not dist.main and not torch.distributed.is_initialized()
    monkeypatch.setenv("WORLD_SIZE", "1")
    monkeypatch.setenv("RANK", "0")
    assert Dist().start().main and not torch.distributed.is_initialized()


def test_loop_state_resumes_from_a_checkpoint_as_it_was_saved(tmp_path):
    from dataclasses import asdict

    from segflow.train.loop import LoopState

    saver = CheckpointSaver(tmp_path / "ckpt", one_process())
    model, p = trained()
    state = LoopState(epoch=2, iteration=40, best=0.5, best_epoch=1, history=[{"epoch": 0, "train_loss": 1.5}])
    state.identity = {"data": "abc"}
    saver.save(model, [p], Objective(), asdict(state))
    assert LoopState(**saver.restore(saver.read(), model, [p], Objective())) == state
