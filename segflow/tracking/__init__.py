"""MLflow runs: one parent run per pipeline run, one nested run per stage.

Where runs go: ``MLFLOW_TRACKING_URI`` when set (an MLflow server on a cluster), otherwise a
SQLite file under ``$SEGFLOW_HOME`` (default ``./runs``) with artifacts beside it, so a laptop
needs no server: ``mlflow ui --backend-store-uri sqlite:///runs/mlflow.db`` shows them.
"""

from segflow.configs import flatten
from segflow.storage import home
from segflow.tracking.pipeline_run import PIPELINE_RUN_TAG, RunContext, code_tags, end_pipeline_run, pipeline_parent
from segflow.tracking.stage_run import FINGERPRINT_TAG, STAGE_TAG, DatasetRef, StageLog, stage_log, stage_run
from segflow.tracking.store import DEFAULT_EXPERIMENT, client, ensure_experiment, experiment_name, tracking_uri

__all__ = [
    "DEFAULT_EXPERIMENT",
    "FINGERPRINT_TAG",
    "PIPELINE_RUN_TAG",
    "STAGE_TAG",
    "DatasetRef",
    "RunContext",
    "StageLog",
    "client",
    "code_tags",
    "end_pipeline_run",
    "ensure_experiment",
    "experiment_name",
    "flatten",
    "home",
    "pipeline_parent",
    "stage_log",
    "stage_run",
    "tracking_uri",
]
