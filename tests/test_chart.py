"""The chart: values validate against values.schema.json, and every template renders to valid objects.

No helm binary here: tests/chart_render.py renders the subset of Go templates the chart uses and
refuses anything else (NeedsHelm), so what helm would add (its own functions, lookups) is not
checked here; `helm lint charts/segflow` on a machine with helm is the complete check.
"""

from __future__ import annotations

import copy
import json

import jsonschema
import pytest
import yaml
from chart_render import Renderer
from conftest import REPO

CHART = REPO / "charts/segflow"
DEFAULTS = yaml.safe_load((CHART / "values.yaml").read_text())
SCHEMA = json.loads((CHART / "values.schema.json").read_text())
POSTGRES = {"type": "postgresql", "postgresql": {"existingSecret": "mlflow-db", "uriKey": "uri"}}


def values(**changes) -> dict:
    out = copy.deepcopy(DEFAULTS)
    for dotted, value in changes.items():
        *path, last = dotted.split("__")
        node = out
        for part in path:
            node = node[part]
        node[last] = value
    return out


def render(vals: dict) -> dict[tuple[str, str], dict]:
    jsonschema.validate(vals, SCHEMA)
    renderer = Renderer(CHART, vals)
    objects = [obj for t in sorted((CHART / "templates").glob("*.yaml")) for obj in renderer.render(t)]
    for obj in objects:
        assert {"apiVersion", "kind", "metadata"} <= obj.keys(), obj
    return {(o["kind"], o["metadata"]["name"] + "@" + o["metadata"].get("namespace", "segflow")): o for o in objects}


def deployment(objects: dict) -> dict:
    return objects[("Deployment", "segflow-mlflow@segflow")]["spec"]["template"]["spec"]


def test_defaults_validate_and_render_sqlite_on_a_volume():
    objects = render(DEFAULTS)
    pod = deployment(objects)
    env = {e["name"]: e for e in pod["containers"][0]["env"]}
    assert env["MLFLOW_BACKEND_STORE_URI"]["value"] == "sqlite:////mlflow/mlflow.db"
    assert ("PersistentVolumeClaim", "segflow-mlflow@segflow") in objects
    assert pod["volumes"][0]["persistentVolumeClaim"]["claimName"] == "segflow-mlflow"
    assert objects[("Deployment", "segflow-mlflow@segflow")]["spec"]["strategy"]["type"] == "Recreate"
    args = pod["containers"][0]["args"]
    assert "--serve-artifacts" in args and "--artifacts-destination=s3://segflow-artifacts/mlflow" in args
    assert pod["securityContext"]["runAsNonRoot"] is True


def test_kfp_launcher_sets_the_default_pipeline_root_in_the_pipelines_namespace():
    objects = render(values(pipelineRoot="s3://team-bucket/kfp"))
    launcher = objects[("ConfigMap", f"kfp-launcher@{DEFAULTS['pipelinesNamespace']}")]
    assert launcher["data"]["defaultPipelineRoot"] == "s3://team-bucket/kfp"
    assert ("ConfigMap", f"kfp-launcher@{DEFAULTS['pipelinesNamespace']}") not in render(
        values(kfpLauncher__create=False)
    )


def test_postgresql_backend_reads_its_uri_from_a_secret_and_can_scale():
    objects = render(values(mlflow__backend=POSTGRES, mlflow__replicas=2))
    pod = deployment(objects)
    env = {e["name"]: e for e in pod["containers"][0]["env"]}
    assert env["MLFLOW_BACKEND_STORE_URI"]["valueFrom"]["secretKeyRef"] == {"name": "mlflow-db", "key": "uri"}
    assert "--backend-store-uri=$(MLFLOW_BACKEND_STORE_URI)" in pod["containers"][0]["args"]
    assert "volumes" not in pod and "volumeMounts" not in pod["containers"][0]
    assert not any(kind == "PersistentVolumeClaim" for kind, _ in objects)
    assert objects[("Deployment", "segflow-mlflow@segflow")]["spec"]["replicas"] == 2


def test_s3_credentials_reach_both_the_components_and_the_mlflow_server():
    objects = render(values(s3__accessKeyId="AKIAEXAMPLE", s3__secretAccessKey="secret"))
    for namespace in (DEFAULTS["pipelinesNamespace"], "segflow"):
        assert objects[("Secret", f"segflow-s3@{namespace}")]["stringData"]["AWS_ACCESS_KEY_ID"] == "AKIAEXAMPLE"
    assert not any(name.startswith("segflow-s3@") for _, name in render(DEFAULTS))


@pytest.mark.parametrize(
    "bad",
    [
        {"mlflow__backend": {"type": "postgresql"}},  # no Secret named
        {"mlflow__backend": {"type": "mysql"}},
        {"mlflow__replicas": 2},  # SQLite has one writer
        {"pipelineRoot": "/local/path"},
        {"mlflow__artifactsDestination": "gs://bucket"},
        {"s3__endpointUrl": "minio:9000"},
        {"mlflow__resources": {"requests": {"cpu": "a lot"}}},
        {"mlfow": {}},  # a typo is an error, not a silently ignored value
    ],
)
def test_schema_refuses_bad_values(bad):
    vals = values(**bad) if "mlfow" not in bad else {**DEFAULTS, "mlfow": {}}
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(vals, SCHEMA)
