"""`segflow submit` and `segflow schedule` against a loopback KFP API server (tests/kfp_fake.py)
that checks every request body against kfp_server_api's models."""

from __future__ import annotations

import pytest
import yaml
from conftest import REPO, run_cli
from kfp_fake import FakeKfp, check

PIPELINE = REPO / "pipelines" / "selfsl_then_finetune.py"
RETRAIN = REPO / "pipelines" / "retrain.py"


@pytest.fixture
def kfp_server(monkeypatch):
    monkeypatch.delenv("KF_PIPELINES_TOKEN", raising=False)
    with FakeKfp() as server:
        yield server


def posted(server, path: str) -> list[dict]:
    return [body for method, p, body in server.requests if method == "POST" and p == path]


def test_submit_creates_a_run_of_the_compiled_pipeline(kfp_server):
    code, out, err = run_cli(
        "submit", PIPELINE, "--host", kfp_server.url, "--experiment", "street", "--run-name", "first",
        "-p", "epochs=300", "-p", "data_uri=s3://data/labelled",
        "--gpu-node-selector", "cloud.google.com/gke-accelerator=nvidia-l4", "--gpus", "2",
    )  # fmt: skip
    assert code == 0, err
    (experiment,) = posted(kfp_server, "/apis/v2beta1/experiments")
    assert experiment["display_name"] == "street"
    (run,) = posted(kfp_server, "/apis/v2beta1/runs")
    assert run["display_name"] == "first" and run["experiment_id"] in kfp_server.experiments
    assert run["runtime_config"]["parameters"] == {"epochs": 300, "data_uri": "s3://data/labelled"}
    spec = run["pipeline_spec"]
    assert spec["pipeline_spec"]["pipelineInfo"]["name"] == "selfsl-then-finetune"
    selector = spec["platform_spec"]["platforms"]["kubernetes"]["deploymentSpec"]["executors"]["exec-train-model"]
    assert selector["nodeSelector"]["labels"] == {"cloud.google.com/gke-accelerator": "nvidia-l4"}
    run_id = next(iter(kfp_server.runs))
    assert out.strip().splitlines()[-1] == f"{kfp_server.url}/#/runs/details/{run_id}"


def test_token_is_sent_and_never_written(kfp_server, monkeypatch, tmp_path):
    monkeypatch.setenv("KF_PIPELINES_TOKEN", "sekret-token")
    seen = []
    import http.server

    original = http.server.BaseHTTPRequestHandler.parse_request

    def spy(self):
        ok = original(self)
        seen.append(self.headers.get("Authorization", ""))
        return ok

    monkeypatch.setattr(http.server.BaseHTTPRequestHandler, "parse_request", spy)
    code, _, err = run_cli("submit", PIPELINE, "--host", kfp_server.url)
    assert code == 0, err
    assert "Bearer sekret-token" in seen
    assert "sekret-token" not in str(kfp_server.requests)


def test_schedule_list_and_delete(kfp_server, tmp_path):
    code, out, err = run_cli(
        "schedule", RETRAIN, "--host", kfp_server.url, "--cron", "0 0 3 * * *", "--name", "nightly",
        "-p", "data_uri=s3://landing/street/", "-p", "registered_model=street",
    )  # fmt: skip
    assert code == 0, err
    (job,) = posted(kfp_server, "/apis/v2beta1/recurringruns")
    assert job["display_name"] == "nightly"
    assert job["trigger"]["cron_schedule"]["cron"] == "0 0 3 * * *"
    assert int(job["max_concurrency"]) == 1 and job["no_catchup"] is True and job["mode"] == "ENABLE"
    assert job["runtime_config"]["parameters"]["data_uri"] == "s3://landing/street/"
    # The package it carries is a complete, compiled retrain pipeline: the fingerprint check
    # gates the training branch.
    package = job["pipeline_spec"]["pipeline_spec"]
    assert package["pipelineInfo"]["name"] == "retrain"
    handler = package["components"]["comp-exit-handler-1"]["dag"]["tasks"]
    assert "check-data" in handler
    condition = next(t for name, t in handler.items() if name.startswith("condition-"))
    assert "check-data" in yaml.safe_dump(condition["triggerPolicy"])
    (job_id,) = kfp_server.recurring

    code, out, _ = run_cli("schedule", "--list", "--host", kfp_server.url)
    assert code == 0 and job_id in out and "nightly" in out and "0 0 3 * * *" in out
    code, out, _ = run_cli("schedule", "--delete", job_id, "--host", kfp_server.url)
    assert code == 0 and kfp_server.recurring == {}


@pytest.mark.parametrize("cron", ["0 3 * * *", "every night"])
def test_five_field_cron_is_refused_before_anything_is_sent(kfp_server, cron):
    code, _, err = run_cli("schedule", RETRAIN, "--host", kfp_server.url, "--cron", cron)
    assert code == 2 and "6 fields" in err
    assert posted(kfp_server, "/apis/v2beta1/recurringruns") == []


def test_unreachable_server_is_a_clear_error():
    code, _, err = run_cli("submit", PIPELINE, "--host", "http://127.0.0.1:9")
    assert code == 2 and "cannot reach the Kubeflow Pipelines API" in err and "Traceback" not in err


def test_the_fake_refuses_malformed_bodies():
    """The check the fake applies really rejects what kfp_server_api's models do not describe."""
    with pytest.raises(ValueError, match="no field"):
        check({"display_name": "x", "pipeline_specs": {}}, "V2beta1Run")
    with pytest.raises(ValueError, match="expected"):
        check({"display_name": "x", "trigger": {"cron_schedule": {"cron": 5.5}}}, "V2beta1RecurringRun")
    with pytest.raises(ValueError):
        check({"display_name": "x", "mode": "SOMETIMES"}, "V2beta1RecurringRun")
