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

from segflow.configs import flatten, json_safe
from segflow.errors import SegflowError
from segflow.redact import redact, redact_logging
from segflow.storage import home

DEFAULT_EXPERIMENT = "segflow"
PIPELINE_RUN_TAG = "segflow.pipeline_run"
STAGE_TAG = "segflow.stage"
FINGERPRINT_TAG = "segflow.dataset_fingerprint"
# MLflow's UI opens an experiment of this kind on its runs table (an unmarked one: on GenAI traces).
EXPERIMENT_KIND = ("mlflow.experimentKind", "custom_model_development")
DIGEST_CHARS = 32  # MLflow stores a dataset digest in 36 characters: the fingerprint's first 32

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

    redact_logging()  # MLflow's logger has its own handler, set up on import
    uri = tracking_uri()
    if redact(uri) != uri:
        # MLflow prints "View run ... at: URL" with the URL as given, password included.
        os.environ["MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT"] = "true"
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
        f"cannot reach the MLflow tracking store {redact(tracking_uri())} ({type(exc).__name__}: {str(exc)[:300]}). "
        "Check MLFLOW_TRACKING_URI, or unset it to track into a local SQLite file."
    )


def client():
    """An MLflow client of the tracking store (a server, or the local SQLite file)."""
    return _mlflow().MlflowClient()


def ensure_experiment(name: str | None = None) -> str:
    """The experiment's id, created when missing (local stores keep artifacts under SEGFLOW_HOME).

    Several stages may create it at the same moment: whoever loses the race reads the winner's.
    """
    mlflow = _mlflow()
    name = experiment_name(name)
    try:
        found = mlflow.get_experiment_by_name(name)
        if found is not None and found.lifecycle_stage == "deleted":
            raise SegflowError(
                f"the MLflow experiment {name!r} (id {found.experiment_id}) was deleted: restore it "
                f"(mlflow experiments restore --experiment-id {found.experiment_id}), or track into another "
                "experiment (SEGFLOW_EXPERIMENT=NAME)."
            )
        if found is not None:
            if EXPERIMENT_KIND[0] not in found.tags:
                mlflow.MlflowClient().set_experiment_tag(found.experiment_id, *EXPERIMENT_KIND)
            return found.experiment_id
        location = None
        if tracking_uri().startswith("sqlite:"):
            location = (home() / "mlartifacts").as_uri()
        try:
            with _store_lock(tracking_uri()):
                found = mlflow.get_experiment_by_name(name)
                if found is not None:
                    return found.experiment_id
                return mlflow.create_experiment(name, artifact_location=location, tags=dict([EXPERIMENT_KIND]))
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


def end_pipeline_run(
    run_key: str,
    succeeded: bool,
    experiment: str | None = None,
    run_name: str = "",
    pipeline: str = "",
    params: dict | None = None,
) -> None:
    """Close the parent run of ``run_key`` FINISHED or FAILED (the pipeline's exit handler calls
    this), with the pipeline's parameters and tags for its name, code version and image, so that
    runs compare in the UI's runs table and compare view."""
    mlflow = _mlflow()
    client = mlflow.MlflowClient()
    parent = pipeline_parent(run_key, run_name, experiment)
    if params:
        logged = client.get_run(parent).data.params
        fresh = {k: _param(v) for k, v in params.items() if k not in logged}
        if fresh:
            client.log_batch(parent, params=[mlflow.entities.Param(k, v) for k, v in sorted(fresh.items())])
    for key, value in {**code_tags(), "segflow.pipeline": pipeline}.items():
        if value:
            client.set_tag(parent, key, value)
    client.set_terminated(parent, "FINISHED" if succeeded else "FAILED")


def _param(value) -> str:
    """A pipeline parameter as text; KFP hands an int parameter over as float text ("3.0")."""
    text = str(value)
    if text.endswith(".0") and text[:-2].lstrip("-").isdigit():
        return text[:-2]
    return text[:6000]


def code_tags() -> dict[str, str]:
    """Which code made a run: the package version, the git commit (a checkout, or SEGFLOW_GIT_COMMIT
    baked into an image) and the image (SEGFLOW_IMAGE, which compiled tasks set)."""
    import importlib.metadata
    import subprocess

    commit = os.environ.get("SEGFLOW_GIT_COMMIT", "")
    if not commit:
        try:
            here = Path(__file__).resolve().parent
            done = subprocess.run(
                ["git", "-C", str(here), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5
            )
            commit = done.stdout.strip() if done.returncode == 0 else ""
        except (OSError, subprocess.SubprocessError):
            commit = ""
    return {
        "segflow.version": importlib.metadata.version("segflow"),
        "segflow.git_commit": commit,
        "segflow.image": os.environ.get("SEGFLOW_IMAGE", ""),
    }


@dataclass(frozen=True)
class DatasetRef:
    """A dataset artifact a stage read: shown in the runs table's Dataset column."""

    name: str
    uri: str
    fingerprint: str
    context: str  # "training", "validation", "target", ...


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

    def chosen(self, values: dict) -> None:
        """Settings the stage chose itself (those left at auto), as params named ``auto.NAME``."""
        if self._run is not None and values:
            _mlflow().log_params({f"auto.{k}": _param(v) for k, v in values.items()})

    def tag(self, key: str, value: str) -> None:
        if self._run is not None:
            _mlflow().set_tag(key, value)

    def result(self, result: dict, name: str = "result.json", files=(), folder: Path | None = None) -> None:
        """A stage's result: its ``metrics``, the whole dict as ``name``, files or a folder as artifacts."""
        if self._run is None:
            return
        mlflow = _mlflow()
        self.metrics(result.get("metrics", {}))
        mlflow.log_dict(json_safe(result), name)
        for path in files:
            if Path(path).exists():
                mlflow.log_artifact(str(path))
        if folder is not None:
            mlflow.log_artifacts(str(folder))
        result["mlflow_run_id"] = self.run_id

    def to_parent(
        self, context: RunContext | None, markdown: str, figure: Path, rows: list[dict], folder: str = "comparison"
    ) -> None:
        """A comparison onto the pipeline's parent run (where runs of the pipeline are compared):
        the table as Markdown and JSON, and the chart, under ``folder``."""
        if self._run is None or context is None or not context.run_key:
            return
        mlflow = _mlflow()
        parent = pipeline_parent(context.run_key, context.run_name, context.experiment or None)
        client = mlflow.MlflowClient()
        client.log_text(parent, markdown, f"{folder}/{folder}.md")
        client.log_dict(parent, {"candidates": rows}, f"{folder}/{folder}.json")
        client.log_artifact(parent, str(figure), folder)

    def parent_tags(self, context: RunContext | None, tags: dict[str, str]) -> None:
        """Tags on the pipeline's parent run (e.g. what a retraining tick decided)."""
        if self._run is None or context is None or not context.run_key:
            return
        client = _mlflow().MlflowClient()
        parent = pipeline_parent(context.run_key, context.run_name, context.experiment or None)
        for key, value in tags.items():
            client.set_tag(parent, key, value)

    def parent_file(self, context: RunContext | None, path: Path, folder: str) -> None:
        """A file (a chart) onto the pipeline's parent run, under ``folder``."""
        if self._run is None or context is None or not context.run_key:
            return
        parent = pipeline_parent(context.run_key, context.run_name, context.experiment or None)
        _mlflow().MlflowClient().log_artifact(parent, str(path), folder)

    def model(self, ir_dir: Path) -> tuple[str, str]:
        """Log an OpenVINO IR folder as the run's pyfunc model; return (model URI, model id), empty when off."""
        if self._run is None:
            return "", ""
        from segflow.export.pyfunc import log_ir

        return log_ir(str(ir_dir))

    def headline(
        self,
        context: RunContext | None,
        metrics: dict | None = None,
        datasets: tuple[DatasetRef, ...] = (),
        model_id: str = "",
    ) -> None:
        """What a stage adds to its pipeline's parent run, where runs are compared: metrics under
        names every pipeline shares (val_mDice, val_dice_CLASS, export_latency_ms, ...), the
        datasets it read as run inputs (digest: the fingerprint), and the logged model it exported.
        The datasets also go to the stage's own run."""
        if self._run is None:
            return
        mlflow = _mlflow()
        client = mlflow.MlflowClient()
        inputs = [_dataset_input(d) for d in datasets]
        if inputs:
            client.log_inputs(self.run_id, datasets=inputs)
        if context is None or not context.run_key:
            return
        parent = pipeline_parent(context.run_key, context.run_name, context.experiment or None)
        numbers = {k: float(v) for k, v in (metrics or {}).items() if isinstance(v, int | float) and v is not None}
        if numbers:
            client.log_batch(parent, metrics=[mlflow.entities.Metric(k, v, _now_ms(), 0) for k, v in numbers.items()])
        if inputs:
            client.log_inputs(parent, datasets=inputs)
            for d in datasets:
                client.set_tag(parent, f"{FINGERPRINT_TAG}.{d.context}", d.fingerprint)
        if model_id:
            client.log_outputs(parent, [mlflow.entities.LoggedModelOutput(model_id, 0)])


def _now_ms() -> int:
    return int(time.time() * 1000)


def _dataset_input(ref: DatasetRef):
    from mlflow.data.dataset_source_registry import resolve_dataset_source
    from mlflow.data.meta_dataset import MetaDataset
    from mlflow.entities import DatasetInput, InputTag
    from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT

    uri = ref.uri if "://" in ref.uri else str(Path(ref.uri).resolve())
    dataset = MetaDataset(resolve_dataset_source(uri), name=ref.name, digest=ref.fingerprint[:DIGEST_CHARS])
    return DatasetInput(dataset._to_mlflow_entity(), tags=[InputTag(MLFLOW_DATASET_CONTEXT, ref.context)])


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
