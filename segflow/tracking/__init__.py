"""MLflow runs: one parent run per pipeline run, one nested run per stage.

Where runs go: ``MLFLOW_TRACKING_URI`` when set (an MLflow server on a cluster), otherwise a
SQLite file under ``$SEGFLOW_HOME`` (default ``./runs``) with artifacts beside it, so a laptop
needs no server: ``mlflow ui --backend-store-uri sqlite:///runs/mlflow.db`` shows them.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from segflow.configs import flatten
from segflow.errors import SegflowError
from segflow.storage import home

DEFAULT_EXPERIMENT = "segflow"
PIPELINE_RUN_TAG = "segflow.pipeline_run"
STAGE_TAG = "segflow.stage"
FINGERPRINT_TAG = "segflow.dataset_fingerprint"

log = logging.getLogger(__name__)
_SETTLE_SECONDS = 2.0


def tracking_uri() -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{home() / 'mlflow.db'}"


def experiment_name(name: str | None = None) -> str:
    return name or os.environ.get("SEGFLOW_EXPERIMENT") or DEFAULT_EXPERIMENT


def _sqlite_path(uri: str) -> Path | None:
    return Path(uri[len("sqlite:///") :]) if uri.startswith("sqlite:///") else None


@contextlib.contextmanager
def _store_lock(uri: str) -> Iterator[None]:
    """Serialise first contact with a SQLite store across processes: a fresh store runs its schema
    migrations on first use, and two processes migrating at once fail (parallel pipeline branches
    start together). A server store needs no lock: the server migrates once, at its own start."""
    path = _sqlite_path(uri)
    if path is None:
        yield
        return
    import fcntl

    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.parent / f".{path.name}.lock", "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)  # blocking: the holder only migrates, which takes seconds
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


_READY: set[str] = set()


def _mlflow():
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    # A dead or silent server fails within about a minute instead of retrying for many.
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "30")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "3")
    logging.getLogger("alembic").setLevel(logging.WARNING)
    import mlflow

    uri = tracking_uri()
    mlflow.set_tracking_uri(uri)
    if uri not in _READY:
        with _store_lock(uri):
            try:
                mlflow.MlflowClient().search_experiments(max_results=1)  # creates / migrates a SQLite store
            except Exception as exc:
                raise _unreachable(exc) from None
        _READY.add(uri)
    return mlflow


def _unreachable(exc: Exception) -> SegflowError:
    return SegflowError(
        f"cannot reach the MLflow tracking store {tracking_uri()} ({type(exc).__name__}: {str(exc)[:300]}). "
        "Check MLFLOW_TRACKING_URI, or unset it to track into a local SQLite file."
    )


def ensure_experiment(name: str | None = None) -> str:
    """The experiment's id, created when missing (local stores keep artifacts under SEGFLOW_HOME).

    Several stages may create it at the same moment: whoever loses the race reads the winner's.
    """
    mlflow = _mlflow()
    name = experiment_name(name)
    try:
        found = mlflow.get_experiment_by_name(name)
        if found is not None:
            return found.experiment_id
        location = None
        if tracking_uri().startswith("sqlite:"):
            location = (home() / "mlartifacts").as_uri()
        try:
            with _store_lock(tracking_uri()):
                found = mlflow.get_experiment_by_name(name)
                if found is not None:
                    return found.experiment_id
                return mlflow.create_experiment(name, artifact_location=location)
        except mlflow.exceptions.MlflowException as exc:
            found = mlflow.get_experiment_by_name(name)
            if exc.error_code != "RESOURCE_ALREADY_EXISTS" or found is None:
                raise
            return found.experiment_id
    except SegflowError:
        raise
    except Exception as exc:
        raise _unreachable(exc) from None


def pipeline_parent(run_key: str, run_name: str = "", experiment: str | None = None) -> str:
    """The parent run of pipeline run ``run_key`` (the KFP job id), created by whichever stage asks first.

    Stages of one pipeline run may start at the same moment. On a SQLite store, find-or-create
    runs under the store's file lock, so exactly one parent is made. On a server, a creator waits
    a moment and looks again, so that racing creators see each other; all settle on the oldest
    (ties: smallest id) and the others delete theirs.
    """
    mlflow = _mlflow()
    client = mlflow.MlflowClient()
    experiment_id = ensure_experiment(experiment)
    query = f"tags.`{PIPELINE_RUN_TAG}` = '{run_key}'"

    def oldest():
        runs = client.search_runs([experiment_id], query, max_results=50)
        return min(runs, key=lambda r: (r.info.start_time, r.info.run_id)) if runs else None

    with _store_lock(tracking_uri()):
        found = oldest()
        if found is not None:
            return found.info.run_id
        mine = client.create_run(experiment_id, run_name=run_name or run_key, tags={PIPELINE_RUN_TAG: run_key})
    if _sqlite_path(tracking_uri()) is None:
        time.sleep(_SETTLE_SECONDS)  # let a creator that raced us commit, so both pick the same winner
        winner = oldest()
        if winner is not None and winner.info.run_id != mine.info.run_id:
            client.delete_run(mine.info.run_id)
            return winner.info.run_id
    return mine.info.run_id


def end_pipeline_run(run_key: str, succeeded: bool, experiment: str | None = None) -> None:
    """Mark the parent run of ``run_key`` FINISHED or FAILED (the pipeline's exit handler calls this)."""
    mlflow = _mlflow()
    client = mlflow.MlflowClient()
    runs = client.search_runs([ensure_experiment(experiment)], f"tags.`{PIPELINE_RUN_TAG}` = '{run_key}'")
    for run in runs:
        client.set_terminated(run.info.run_id, "FINISHED" if succeeded else "FAILED")


@dataclass(frozen=True)
class RunContext:
    """Which pipeline run a stage belongs to (KFP fills these from its job id and name)."""

    run_key: str = ""
    run_name: str = ""
    experiment: str = ""


@contextlib.contextmanager
def stage_run(stage: str, config: Any = None, context: RunContext | None = None, label: str = "") -> Iterator[Any]:
    """A run for one stage: nested under its pipeline's parent run when ``context`` names one.

    The run ends FAILED, with the error as a tag, when the stage raises.
    """
    mlflow = _mlflow()
    context = context or RunContext()
    experiment = context.experiment or None
    parent = pipeline_parent(context.run_key, context.run_name, experiment) if context.run_key else None
    with mlflow.start_run(
        run_name=f"{stage} {label}".strip(),
        experiment_id=ensure_experiment(experiment),
        parent_run_id=parent,
        nested=parent is not None,
        tags={STAGE_TAG: stage},
    ) as run:
        if config is not None:
            mlflow.log_params(flatten(config))
        try:
            yield run
        except BaseException as exc:
            mlflow.set_tag("segflow.error", str(exc)[:5000])
            raise


class StageLog:
    """What a stage logs to its MLflow run. Every method does nothing when tracking is off
    (``--no-track``, or a process other than rank 0), so stages log unconditionally."""

    def __init__(self, run=None) -> None:
        self._run = run

    @property
    def run_id(self) -> str:
        return self._run.info.run_id if self._run is not None else ""

    def metrics(self, values: dict, step: int | None = None) -> None:
        numbers = {k: float(v) for k, v in values.items() if isinstance(v, int | float) and not isinstance(v, bool)}
        if self._run is not None and numbers:
            _mlflow().log_metrics(numbers, step=step)

    def epoch(self, epoch: int, record: dict) -> None:
        """The engine's per-epoch record, as curves (step = epoch, from 1)."""
        self.metrics(record, step=epoch + 1)

    def tag(self, key: str, value: str) -> None:
        if self._run is not None:
            _mlflow().set_tag(key, value)

    def result(self, result: dict, name: str = "result.json", files=(), folder: Path | None = None) -> None:
        """A stage's result: its ``metrics``, the whole dict as ``name``, files or a folder as artifacts."""
        if self._run is None:
            return
        mlflow = _mlflow()
        self.metrics(result.get("metrics", {}))
        mlflow.log_dict(_jsonable(result), name)
        for path in files:
            if Path(path).exists():
                mlflow.log_artifact(str(path))
        if folder is not None:
            mlflow.log_artifacts(str(folder))
        result["mlflow_run_id"] = self.run_id

    def to_parent(self, context: RunContext | None, markdown: str, figure: Path, rows: list[dict]) -> None:
        """A comparison onto the pipeline's parent run (where runs of the pipeline are compared):
        the table as Markdown and JSON, and the chart."""
        if self._run is None or context is None or not context.run_key:
            return
        mlflow = _mlflow()
        parent = pipeline_parent(context.run_key, context.run_name, context.experiment or None)
        client = mlflow.MlflowClient()
        client.log_text(parent, markdown, "comparison/comparison.md")
        client.log_dict(parent, {"candidates": rows}, "comparison/comparison.json")
        client.log_artifact(parent, str(figure), "comparison")

    def model(self, ir_dir: Path) -> str:
        """Log an OpenVINO IR folder as the run's pyfunc model; return its URI ("" when off)."""
        if self._run is None:
            return ""
        from segflow.export.pyfunc import log_ir

        return log_ir(str(ir_dir))


def _jsonable(value):
    import json

    return json.loads(json.dumps(value, default=str))


@contextlib.contextmanager
def stage_log(
    stage: str, config: Any = None, context: RunContext | None = None, label: str = "", enabled: bool = True
) -> Iterator[StageLog]:
    """A stage's MLflow run (nested under its pipeline's parent run), or a log that does nothing."""
    if not enabled:
        yield StageLog()
        return
    with stage_run(stage, config, context, label) as run:
        yield StageLog(run)
