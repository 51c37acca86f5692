"""Run a training stage in several processes of this machine (one per GPU), with torchrun.

    run_distributed("train", cfg, run, nproc=4)

A KFP training task asks for N GPUs in one pod and calls this: torchrun starts N copies of
``python -m segflow.launch SPEC`` (NCCL on GPUs, gloo on CPU), each runs the same stage, the
engine's DDP does the rest (one process writes, checkpoints and tracks), and rank 0 leaves the
stage's result where this process reads it. Resume works as in one process: the checkpoint holds
the whole run's state.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import tempfile
from dataclasses import asdict, replace
from pathlib import Path

from segflow import storage
from segflow.errors import SegflowError
from segflow.redact import redact_logging
from segflow.results import StageResult


def _stages() -> dict:
    """Stage name -> (its config type, its function, its result type), for the stages that train."""
    from segflow import stages
    from segflow.adapt.config import AdaptConfig
    from segflow.results import AdaptResult, PretrainResult, TrainResult
    from segflow.selfsl.config import PretrainConfig
    from segflow.train.config import TrainConfig

    return {
        "train": (TrainConfig, stages.train_stage, TrainResult),
        "pretrain": (PretrainConfig, stages.pretrain_stage, PretrainResult),
        "adapt": (AdaptConfig, stages.adapt_stage, AdaptResult),
    }


def _log_to_stderr() -> None:
    """In a pod nothing configures logging: show the stage's progress (resuming, epochs) in its log."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    redact_logging()


def run_stage(stage: str, cfg, run=None, processes: int = 0, track: bool = True) -> StageResult:
    """A training stage in ``processes`` processes; 0: one per visible GPU. One process runs here."""
    _log_to_stderr()  # a no-op where logging is set up already (the CLI)
    if processes <= 0:
        import torch

        processes = max(1, torch.cuda.device_count())
    if processes == 1:
        return _stages()[stage][1](cfg, run, track=track)
    return run_distributed(stage, cfg, run, processes, track)


def task_key(stage: str, cfg, task_name: str) -> str:
    """The name a task's checkpoints are kept under. The branches of a ParallelFor share one task
    name, so adaptation adds its method and levels."""
    return f"{task_name}-{cfg.method}-{cfg.levels}" if stage == "adapt" else task_name


def run_task(stage: str, cfg, run, processes: int = 0, checkpoint_root: str = "", task_name: str = "") -> StageResult:
    """A training stage as one pipeline task. The task's output path is its own (overwritten); its
    checkpoints live under the pipeline root (``checkpoint_root``), keyed by run and task, so a
    retry in a fresh pod resumes from them; they are removed once the output is published."""
    checkpoints = storage.task_checkpoints(checkpoint_root, run.run_key if run else "", task_key(stage, cfg, task_name))
    cfg = replace(cfg, resume=True, overwrite=True, checkpoint_dir=checkpoints)
    result = run_stage(stage, cfg, run, processes)
    storage.remove_task_checkpoints(checkpoints)
    return result


def run_distributed(stage: str, cfg, run=None, nproc: int = 2, track: bool = True) -> StageResult:
    """The stage's result, computed by ``nproc`` processes; a failed process fails the call."""
    if stage not in _stages():
        raise SegflowError(f"stage {stage!r} does not train: choose one of {', '.join(_stages())}.")
    with tempfile.TemporaryDirectory(prefix="segflow-launch-") as tmp:
        spec, result = Path(tmp) / "spec.json", Path(tmp) / "result.json"
        run_fields = asdict(run) if run is not None else None
        spec.write_text(json.dumps({"stage": stage, "config": asdict(cfg), "run": run_fields, "track": track}))
        command = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",  # one pod: rendezvous on a free local port
            f"--nproc-per-node={nproc}",
            "-m",
            "segflow.launch",
            str(spec),
            str(result),
        ]
        # Each process gets its share of the cores (torchrun would set 1 thread per process).
        threads = max(1, (os.cpu_count() or 1) // nproc)
        done = subprocess.run(command, env={**os.environ, "OMP_NUM_THREADS": str(threads)})
        if done.returncode != 0 or not result.exists():
            raise SegflowError(
                f"the {nproc}-process {stage} run failed (exit code {done.returncode}); its processes' output "
                "above says why."
            )
        return _stages()[stage][2].of(json.loads(result.read_text()))


def main(spec_path: str, result_path: str) -> None:
    """One process of a torchrun launch."""
    from segflow.configs import from_dict
    from segflow.tracking import RunContext
    from segflow.train.distributed import is_main_process

    _log_to_stderr()
    spec = json.loads(Path(spec_path).read_text())
    config_type, stage, _ = _stages()[spec["stage"]]
    run = RunContext(**spec["run"]) if spec["run"] else None
    try:
        result = stage(from_dict(config_type, spec["config"]), run, track=spec["track"])
    except SegflowError as exc:  # a user's error: one line, as the CLI prints it
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(exc.exit_code)
    if is_main_process():
        Path(result_path).write_text(json.dumps(result.to_json()))


if __name__ == "__main__":
    main(*sys.argv[1:3])
