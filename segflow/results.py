"""What each stage returns: a typed result, one class per stage.

A stage's library call writes a record beside its output (report.json, training.json,
metrics.json ...). The result keeps that record whole (``record``, what ``to_json`` gives back)
and names, as typed fields, the figures that other layers read: the CLI prints them, a KFP
component puts them in its artifacts' metadata, a pipeline branches on them. A renamed figure
then fails where the result is read (an AttributeError in a unit test, a type checker's
complaint), not in a pipeline pod. ``metrics`` are the stage's headline numbers, logged by both
MLflow and the KFP Metrics artifact.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any, Self

from segflow.configs import json_safe


@dataclass
class StageResult:
    metrics: dict[str, float] = field(default_factory=dict)
    record: dict[str, Any] = field(default_factory=dict, repr=False)

    @classmethod
    def of(cls, record: dict) -> Self:
        """The typed view of a stage's record: each field from the record's key of its name (None
        where the record has none)."""
        named = {f.name for f in fields(cls)} - {"metrics", "record"}
        return cls(metrics=dict(record.get("metrics") or {}), record=record, **{n: record.get(n) for n in named})

    def to_json(self) -> dict:
        """The record, metrics included, as JSON values."""
        return json_safe(self.record | {"metrics": self.metrics})


@dataclass
class ImportResult(StageResult):
    fingerprint: str = ""
    labels: list[str] = field(default_factory=list)
    counts: dict[str, int] = field(default_factory=dict)  # images per subset
    warnings: list[str] = field(default_factory=list)


@dataclass
class PseudoMasksResult(StageResult):
    images: int = 0
    made: int = 0
    reused: int = 0
    segments_per_image: float = 0.0
    params: dict[str, float] = field(default_factory=dict)  # the Felzenszwalb parameters used
    params_chosen_by: str = ""
    out: str = ""


@dataclass
class PretrainResult(StageResult):
    chosen: dict[str, Any] = field(default_factory=dict)  # settings chosen for the run (auto rules)
    pseudo_masks: dict[str, Any] = field(default_factory=dict)  # masks made first ({} when there were)


@dataclass
class TrainResult(StageResult):
    best_val_mDice: float | None = None
    best_epoch: int = 0
    epochs_run: int = 0
    dataset_fingerprint: str = ""
    tiling: dict[str, Any] | None = None


@dataclass
class AdaptResult(StageResult):
    method: str = ""
    levels: str = ""
    selection: dict[str, Any] = field(default_factory=dict)  # criterion, snapshot and its score
    source_fingerprint: str = ""


@dataclass
class EnsembleResult(StageResult):
    members: list[str] = field(default_factory=list)
    labels: list[str] = field(default_factory=list)


@dataclass
class ChooseResult(StageResult):
    best: str = ""
    metric: str = ""
    candidates: list[dict[str, Any]] = field(default_factory=list)  # candidate, mIoU, mDice, model


@dataclass
class EvaluateResult(StageResult):
    mDice: float = 0.0
    mIoU: float = 0.0
    pixel_accuracy: float = 0.0
    images: int = 0
    subset: str = ""
    labels: list[str] = field(default_factory=list)
    confusion_matrix: list[list[int]] = field(default_factory=list)
    dataset_fingerprint: str = ""


@dataclass
class ExportResult(StageResult):
    precision: str = ""
    latency_ms: float = 0.0
    throughput_vs_fp32: float | None = None
    int8_scheme: str | None = None
    passed: bool | None = None  # parity against PyTorch (None: no parity images)
    ir_mDice: float | None = None
    torch_mDice: float | None = None
    max_abs_logit_diff: float | None = None
    model_uri: str = ""  # the IR logged to MLflow as a pyfunc model
    model_id: str = ""


@dataclass
class ConvertResult(StageResult):
    architecture: str = ""
    labels: list[str] = field(default_factory=list)
    format: str | None = None  # the backbone format when only the backbone was converted


@dataclass
class PredictResult(StageResult):
    predicted: int = 0
    skipped: list[dict[str, str]] = field(default_factory=list)
    labels: list[str] = field(default_factory=list)
    runtime: str = ""


@dataclass
class RegisterResult(StageResult):
    version: int = 0
    decision: str = ""  # champion, challenger
    reason: str = ""


@dataclass
class CheckDataResult(StageResult):
    decision: str = ""  # a segflow.lifecycle.Decision value
    note: str = ""
    fingerprint: str = ""
    champion_version: int = 0
    champion_model: str = ""
    champion_data: str = ""
    drift_score: float | None = None
