"""MLflow runs: one parent run per pipeline run, one nested run per stage.

Where runs go: ``MLFLOW_TRACKING_URI`` when set (an MLflow server on a cluster), otherwise a
SQLite file under ``$SEGFLOW_HOME`` (default ``./runs``) with artifacts beside it, so a laptop
needs no server: ``mlflow ui --backend-store-uri sqlite:///runs/mlflow.db`` shows them.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass, is_dataclass
from pathlib import Path
from typing import Any

from segflow.errors import SegflowError

DEFAULT_EXPERIMENT = "segflow"
PIPELINE_RUN_TAG = "segflow.pipeline_run"
STAGE_TAG = "segflow.stage"
FINGERPRINT_TAG = "segflow.dataset_fingerprint"

log = logging.getLogger(__name__)


def home() -> Path:
    """Where local runs, MLflow's store and pipeline outputs live."""
    return Path(os.environ.get("SEGFLOW_HOME", "runs")).expanduser().absolute()


def tracking_uri() -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{home() / 'mlflow.db'}"


def experiment_name(name: str | None = None) -> str:
    return name or os.environ.get("SEGFLOW_EXPERIMENT") or DEFAULT_EXPERIMENT


def _mlflow():
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    logging.getLogger("alembic").setLevel(logging.WARNING)
    import mlflow

    uri = tracking_uri()
    if uri.startswith("sqlite:///"):
        Path(uri[len("sqlite:///") :]).parent.mkdir(parents=True, exist_ok=True)
    mlflow.set_tracking_uri(uri)
    return mlflow


def ensure_experiment(name: str | None = None) -> str:
    """The experiment's id, created when missing (local stores keep artifacts under SEGFLOW_HOME)."""
    mlflow = _mlflow()
    name = experiment_name(name)
    try:
        found = mlflow.get_experiment_by_name(name)
        if found is not None:
            return found.experiment_id
        location = None
        if tracking_uri().startswith("sqlite:"):
            location = (home() / "mlartifacts").as_uri()
        return mlflow.create_experiment(name, artifact_location=location)
    except Exception as exc:
        if isinstance(exc, SegflowError):
            raise
        raise SegflowError(
            f"cannot reach the MLflow tracking store {tracking_uri()} ({type(exc).__name__}: {exc}). "
            "Check MLFLOW_TRACKING_URI, or unset it to track into a local SQLite file."
        ) from None


def flatten(config: Any, prefix: str = "") -> dict[str, str]:
    """Nested dataclasses / dicts to MLflow params: {"train.lr": "0.001", ...}."""
    if is_dataclass(config) and not isinstance(config, type):
        config = asdict(config)
    flat: dict[str, str] = {}
    if isinstance(config, Mapping):
        for key, value in config.items():
            name = f"{prefix}.{key}" if prefix else str(key)
            if isinstance(value, Mapping) or (is_dataclass(value) and not isinstance(value, type)):
                flat.update(flatten(value, name))
            else:
                flat[name] = str(value)[:6000]  # MLflow's limit on a param value
    return flat


def pipeline_parent(run_key: str, run_name: str = "", experiment: str | None = None) -> str:
    """The parent run of pipeline run ``run_key`` (the KFP job id), created by whichever stage asks first.

    Stages of one pipeline run may start at the same moment, so two may create a parent. Each
    creator then looks again and every stage settles on the oldest (ties: smallest id); a creator
    whose run lost deletes it. No extra pipeline task is needed and nothing depends on order.
    """
    mlflow = _mlflow()
    client = mlflow.MlflowClient()
    experiment_id = ensure_experiment(experiment)
    query = f"tags.`{PIPELINE_RUN_TAG}` = '{run_key}'"

    def oldest():
        runs = client.search_runs([experiment_id], query, max_results=50)
        return min(runs, key=lambda r: (r.info.start_time, r.info.run_id)) if runs else None

    found = oldest()
    if found is not None:
        return found.info.run_id
    mine = client.create_run(experiment_id, run_name=run_name or run_key, tags={PIPELINE_RUN_TAG: run_key})
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
