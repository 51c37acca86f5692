"""One MLflow run per stage, nested under its pipeline's parent run: its settings, curves, result,
files, datasets and the headline figures it gives the parent."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from segflow.configs import flatten, json_safe
from segflow.tracking.pipeline_run import RunContext, param_text, pipeline_parent
from segflow.tracking.store import connect, ensure_experiment

STAGE_TAG = "segflow.stage"

FINGERPRINT_TAG = "segflow.dataset_fingerprint"
# MLflow's UI opens an experiment of this kind on its runs table (an unmarked one: on GenAI traces).

DIGEST_CHARS = 32  # MLflow stores a dataset digest in 36 characters: the fingerprint's first 32


@dataclass(frozen=True)
class DatasetRef:
    """A dataset artifact a stage read: shown in the runs table's Dataset column."""

    name: str
    uri: str
    fingerprint: str
    context: str  # "training", "validation", "target", ...


@contextlib.contextmanager
def stage_run(stage: str, config: Any = None, context: RunContext | None = None, label: str = "") -> Iterator[Any]:
    """A run for one stage: nested under its pipeline's parent run when ``context`` names one.

    The run ends FAILED, with the error as a tag, when the stage raises.
    """
    mlflow = connect()
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
            connect().log_metrics(numbers, step=step)

    def epoch(self, epoch: int, record: dict) -> None:
        """The engine's per-epoch record, as curves (step = epoch, from 1)."""
        self.metrics(record, step=epoch + 1)

    def chosen(self, values: dict) -> None:
        """Settings the stage chose itself (those left at auto), as params named ``auto.NAME``."""
        if self._run is not None and values:
            connect().log_params({f"auto.{k}": param_text(v) for k, v in values.items()})

    def tag(self, key: str, value: str) -> None:
        if self._run is not None:
            connect().set_tag(key, value)

    def result(self, result: dict, name: str = "result.json", files=(), folder: Path | None = None) -> None:
        """A stage's result: its ``metrics``, the whole dict as ``name``, files or a folder as artifacts."""
        if self._run is None:
            return
        mlflow = connect()
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
        mlflow = connect()
        parent = pipeline_parent(context.run_key, context.run_name, context.experiment or None)
        client = mlflow.MlflowClient()
        client.log_text(parent, markdown, f"{folder}/{folder}.md")
        client.log_dict(parent, {"candidates": rows}, f"{folder}/{folder}.json")
        client.log_artifact(parent, str(figure), folder)

    def parent_tags(self, context: RunContext | None, tags: dict[str, str]) -> None:
        """Tags on the pipeline's parent run (e.g. what a retraining tick decided)."""
        if self._run is None or context is None or not context.run_key:
            return
        client = connect().MlflowClient()
        parent = pipeline_parent(context.run_key, context.run_name, context.experiment or None)
        for key, value in tags.items():
            client.set_tag(parent, key, value)

    def parent_file(self, context: RunContext | None, path: Path, folder: str) -> None:
        """A file (a chart) onto the pipeline's parent run, under ``folder``."""
        if self._run is None or context is None or not context.run_key:
            return
        parent = pipeline_parent(context.run_key, context.run_name, context.experiment or None)
        connect().MlflowClient().log_artifact(parent, str(path), folder)

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
        mlflow = connect()
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
