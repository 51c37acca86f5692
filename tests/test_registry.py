"""The model lifecycle against a real `mlflow server` on loopback: PostgreSQL backend when the
machine has one (else SQLite), artifacts proxied to moto's S3 server.

Champion / challenger with a margin, re-scoring a champion on new validation data, two
registrations at once (no lost update), `segflow models compare`, and an exported IR registered
end to end with its files landing in S3 through the server.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid

import mlflow
import pytest
from conftest import run_cli
from mlflow_server import mlflow_server

from segflow import registry

FP_A, FP_B = "a" * 64, "b" * 64


# One worker runs them all (make test: --dist loadgroup), so the server below starts once.
pytestmark = pytest.mark.xdist_group("registry_server")


@pytest.fixture(scope="module")
def server(s3_endpoint, tmp_path_factory):
    import boto3

    bucket = f"mlflow-{uuid.uuid4().hex[:8]}"
    s3 = boto3.client(
        "s3",
        endpoint_url=s3_endpoint,
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
        region_name="us-east-1",
    )
    s3.create_bucket(Bucket=bucket)
    with mlflow_server(tmp_path_factory.mktemp("mlflow_server"), s3_endpoint, bucket) as (uri, backend):
        yield {"uri": uri, "backend": backend, "bucket": bucket, "s3": s3}


@pytest.fixture
def client(server, monkeypatch, segflow_home):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", server["uri"])
    mlflow.set_tracking_uri(server["uri"])
    return mlflow.MlflowClient(server["uri"])


def candidate(client, mdice: float, fingerprint: str = FP_A, artifact: str = "") -> registry.Candidate:
    experiment = client.get_experiment_by_name("Default").experiment_id
    model = client.create_logged_model(experiment, name="model")
    scores = {"val_mDice": mdice, "val_mIoU": mdice - 0.1, "val_dice_road": mdice + 0.05}
    return registry.Candidate(model.model_id, artifact, scores, fingerprint, "t" * 64)


def test_backend_is_postgresql_where_the_machine_has_one(server):
    from mlflow_server import postgres_uri

    if postgres_uri() is None:
        pytest.skip("no PostgreSQL on 127.0.0.1:5432: the server runs on SQLite")
    assert server["backend"].startswith("postgresql+psycopg2://")


def test_champion_changes_only_when_beaten_by_the_margin(client):
    name = f"m-{uuid.uuid4().hex[:6]}"
    first = registry.register(client, name, candidate(client, 0.50), margin=0.02)
    assert first["decision"] == "champion" and first["version"] == 1
    close = registry.register(client, name, candidate(client, 0.51), margin=0.02)
    assert close["decision"] == "challenger" and "does not beat champion v1" in close["reason"]
    better = registry.register(client, name, candidate(client, 0.56), margin=0.02)
    assert better["decision"] == "champion"
    assert client.get_model_version_by_alias(name, "champion").version == "3"
    assert client.get_model_version_by_alias(name, "challenger").version == "3"
    v2 = client.get_model_version(name, "2")
    assert v2.tags[registry.DECISION] == "challenger" and v2.tags["segflow.score.val_mDice"] == "0.51"
    assert v2.tags[registry.VAL_FINGERPRINT] == FP_A
    assert client.get_model_version(name, "1").tags[registry.SUPERSEDED_BY] == "3"  # v1 was champion until v3
    assert registry.SUPERSEDED_BY not in v2.tags


def test_champion_is_rescored_on_new_validation_data(client):
    name = f"m-{uuid.uuid4().hex[:6]}"
    registry.register(client, name, candidate(client, 0.70, FP_A, artifact="s3://models/champion"))
    asked = []

    def rescore(artifact: str) -> dict:
        asked.append(artifact)
        return {"val_mDice": 0.40, "val_mIoU": 0.3}

    # Scored on other data, the champion's 0.70 says nothing: on the new data it scores 0.40.
    new = registry.register(client, name, candidate(client, 0.45, FP_B), rescore=rescore)
    assert asked == ["s3://models/champion"] and new["decision"] == "champion"
    assert "(0.4000)" in new["reason"]
    again = registry.register(client, name, candidate(client, 0.30, FP_B), rescore=rescore)
    assert again["decision"] == "challenger" and asked == ["s3://models/champion"]  # v2 was scored on FP_B


RACER = """
import pathlib, sys, time, mlflow
from segflow import registry
client = mlflow.MlflowClient(sys.argv[1])
experiment = client.get_experiment_by_name("Default").experiment_id
model = client.create_logged_model(experiment, name="model")
scores = {"val_mDice": float(sys.argv[3])}
# Start line: both racers are imported and connected before either registers, so the two
# registrations overlap even on a loaded machine where one interpreter starts seconds late.
ready, go = pathlib.Path(sys.argv[4] + ".ready"), pathlib.Path(sys.argv[4]).parent / "go"
ready.touch()
while not go.exists():
    time.sleep(0.01)
print(registry.register(client, sys.argv[2], registry.Candidate(model.model_id, "", scores, "a" * 64, ""))["decision"])
"""


def test_two_registrations_at_once_leave_one_champion_the_better(client, server, tmp_path):
    name = f"m-{uuid.uuid4().hex[:6]}"
    registry.register(client, name, candidate(client, 0.40))
    script = tmp_path / "racer.py"
    script.write_text(RACER)
    env = {**os.environ, "MLFLOW_TRACKING_URI": server["uri"]}
    racers = [
        subprocess.Popen(
            [sys.executable, str(script), server["uri"], name, score, str(tmp_path / score)],
            env=env,
            stdout=subprocess.PIPE,
            text=True,
        )
        for score in ("0.60", "0.50")
    ]
    deadline = time.monotonic() + 120
    while not all((tmp_path / f"{score}.ready").exists() for score in ("0.60", "0.50")):
        assert time.monotonic() < deadline and all(p.poll() is None for p in racers), "a racer did not start"
        time.sleep(0.05)
    (tmp_path / "go").touch()
    decisions = [p.communicate(timeout=120)[0].strip().splitlines()[-1] for p in racers]
    assert all(p.returncode == 0 for p in racers)
    versions = client.search_model_versions(f"name = '{name}'")
    assert sorted(int(v.version) for v in versions) == [1, 2, 3], "every registration is recorded"
    champion = client.get_model_version_by_alias(name, "champion")
    assert champion.tags["segflow.score.val_mDice"] == "0.6"
    aliases = [client.get_model_version(name, v.version).aliases for v in versions]
    assert sum("champion" in a for a in aliases) == 1 and sum("challenger" in a for a in aliases) == 1
    assert decisions[0] == "champion"
    # The slower one may have been champion for a moment; its tags say what happened: it stood as
    # challenger, or it was champion until the better one took @champion from it.
    loser = next(v for v in versions if v.tags.get("segflow.score.val_mDice") == "0.5")
    tags = client.get_model_version(name, loser.version).tags
    assert tags[registry.DECISION] == "challenger" or tags.get(registry.SUPERSEDED_BY) == champion.version, tags


def test_models_compare_prints_versions_side_by_side(client, server):
    name = f"m-{uuid.uuid4().hex[:6]}"
    registry.register(client, name, candidate(client, 0.50))
    registry.register(client, name, candidate(client, 0.45))
    code, out, err = run_cli("models", "compare", name)  # MLFLOW_TRACKING_URI: the server (fixture)
    assert code == 0, err
    lines = out.splitlines()
    assert "v1 @champion" in lines[0] and "v2 @challenger" in lines[0]
    assert any(line.startswith("val_mDice") and "50.00" in line and "45.00" in line for line in lines)
    assert any(line.startswith("val_dice_road") for line in lines)
    code, _, err = run_cli("models", "compare", "no-such-model")
    assert code == 2 and "no-such-model" in err


def test_exported_ir_registers_end_to_end_with_artifacts_in_s3(client, server, tiny, tiny_ir, tmp_path):
    from segflow.evaluate.evaluation import EvalConfig
    from segflow.export.pyfunc import log_ir
    from segflow.stages import evaluate_stage, register_stage

    evaluation = tmp_path / "evaluation"
    evaluate_stage(EvalConfig(model=str(tiny["model"]), data=str(tiny["data"]), out=str(evaluation)), track=False)
    with mlflow.start_run():
        _, model_id = log_ir(str(tiny_ir["ir"]))
    name = f"m-{uuid.uuid4().hex[:6]}"
    first = register_stage(name, str(tiny["model"]), str(evaluation), str(tiny["data"]), model_id)
    assert first.decision == "champion"
    version = client.get_model_version(name, "1")
    scores = json.loads((evaluation / "metrics.json").read_text())
    assert float(version.tags["segflow.score.val_mDice"]) == pytest.approx(scores["mDice"])
    assert version.tags[registry.MODEL_ARTIFACT] == str(tiny["model"])
    keys = [o["Key"] for o in server["s3"].list_objects_v2(Bucket=server["bucket"]).get("Contents", [])]
    assert any(k.endswith("model.xml") for k in keys), "the IR went to S3 through the server"
    loaded = mlflow.pyfunc.load_model(f"models:/{name}@champion")
    assert loaded.metadata.model_id == model_id
    # The same steps as commands: the same model again does not beat the champion by the margin.
    code, out, err = run_cli("register", "--name", name, "--model", tiny["model"], "--evaluation", evaluation,
                             "--data", tiny["data"], "--model-id", model_id, "--margin", "0.01")  # fmt: skip
    assert code == 0 and f"{name} v2: challenger" in out, err
    code, out, err = run_cli("check-data", tiny["data"], "--registered-model", name)
    said = [line for line in out.splitlines() if line.startswith("new: new data:")]  # MLflow may print a link first
    assert code == 0 and said, out + err  # labelled data the champion never saw
    code, out, err = run_cli("register", "--name", name, "--model", tiny["model"], "--evaluation", evaluation,
                             "--data", tiny["data"], "--model-id", "")  # fmt: skip
    assert code == 2 and "logged to MLflow" in err, err


def test_a_password_in_the_tracking_uri_is_printed_nowhere(server, monkeypatch, css_dataset, tmp_path, caplog):
    """MLflow prints "View run NAME at: URL" after every run on a server, with the URL as given;
    segflow's errors and logs print URIs too. A password in MLFLOW_TRACKING_URI reaches none."""
    secret = "Pw0rd-in-uri"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", server["uri"].replace("http://", f"http://alice:{secret}@"))
    code, out, err = run_cli("data", "import", css_dataset, tmp_path / "ds")
    assert code == 0, err
    assert secret not in out + err + caplog.text
    monkeypatch.setenv("SEGFLOW_EXPERIMENT", "to-be-deleted")
    code, out, err = run_cli("data", "import", css_dataset, tmp_path / "ds2")
    assert code == 0, err
    client = mlflow.MlflowClient(server["uri"])
    client.delete_experiment(client.get_experiment_by_name("to-be-deleted").experiment_id)
    code, out, err = run_cli("data", "import", css_dataset, tmp_path / "ds3")
    assert code == 2 and "was deleted" in err and secret not in out + err + caplog.text, err
