"""Checkpoints of a run: ``last.pt`` to resume from after every epoch, ``best.safetensors`` for the
best epoch so far, both written atomically by one process."""

from __future__ import annotations

import contextlib
import hashlib
import os
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import nn

from segflow.errors import SegflowError
from segflow.models import artifact as model_artifact
from segflow.storage import writing
from segflow.train.distributed import Dist
from segflow.train.objective import Part

CHECKPOINT = "last.pt"
BEST = "best.safetensors"


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


def weights_digest(model: nn.Module) -> str:
    digest = hashlib.sha256()
    for key, value in sorted(model.state_dict().items()):
        digest.update(key.encode())
        digest.update(value.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]
