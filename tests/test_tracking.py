"""MLflow tracking against a real SQLite tracking store."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import mlflow
import pytest

from segflow import tracking
from segflow.data.importer import ImportConfig
from segflow.errors import SegflowError
from segflow.stages import import_stage


def runs(experiment="segflow"):
    mlflow.set_tracking_uri(tracking.tracking_uri())
    return mlflow.search_runs(experiment_names=[experiment], output_format="list")


def test_default_store_is_sqlite_under_segflow_home(segflow_home):
    assert tracking.tracking_uri() == f"sqlite:///{segflow_home / 'mlflow.db'}"
    tracking.ensure_experiment()
    assert (segflow_home / "mlflow.db").exists()


def test_flatten_nested_config():
    @dataclass
    class Inner:
        lr: float = 0.1

    @dataclass
    class Outer:
        name: str = "x"
        inner: Inner = field(default_factory=Inner)

    assert tracking.flatten(Outer()) == {"name": "x", "inner.lr": "0.1"}


def test_stages_nest_under_one_parent_even_when_racing():
    context = tracking.RunContext(run_key="job-123", run_name="my pipeline run")
    with ThreadPoolExecutor(4) as pool:
        parents = set(pool.map(lambda _: tracking.pipeline_parent("job-123", "my pipeline run"), range(4)))
    assert len(parents) == 1
    with tracking.stage_run("import", {"a": 1}, context, label="source"):
        pass
    with pytest.raises(SegflowError), tracking.stage_run("train", None, context):
        raise SegflowError("bad config")
    tracking.end_pipeline_run("job-123", succeeded=False)
    by_name = {r.info.run_name: r for r in runs()}
    parent = by_name["my pipeline run"]
    assert parent.info.run_id in parents and parent.info.status == "FAILED"
    assert by_name["import source"].data.tags["mlflow.parentRunId"] == parent.info.run_id
    assert by_name["import source"].data.params == {"a": "1"}
    assert by_name["train"].info.status == "FAILED"
    assert by_name["train"].data.tags["segflow.error"] == "bad config"


def test_import_stage_logs_fingerprint_counts_and_report(css_dataset, tmp_path):
    report = import_stage(
        ImportConfig(source=str(css_dataset), out=str(tmp_path / "out")), markdown_out=str(tmp_path / "report.md")
    )
    (run,) = runs()
    assert run.data.tags[tracking.FINGERPRINT_TAG] == report.fingerprint
    assert run.data.metrics["images_train"] + run.data.metrics["images_val"] == 12
    assert run.data.params["val_fraction"] == "0.2"
    artifacts = {a.path for a in mlflow.MlflowClient().list_artifacts(run.info.run_id)}
    assert {"report.json", "report.md", "class_distribution.png"} <= artifacts
    assert "data:image/png;base64," in (tmp_path / "report.md").read_text()


def test_unreachable_tracking_server_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:9")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "2")
    with pytest.raises(SegflowError, match="MLFLOW_TRACKING_URI"):
        tracking.ensure_experiment()
