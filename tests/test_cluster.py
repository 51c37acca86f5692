"""Placement on a real cluster: GPU settings exactly on GPU stages, retries on every task, no
credentials in compiled YAML, clear errors for bad settings."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml
from conftest import REPO, run_cli

from segflow.errors import SegflowError
from segflow_kfp import cluster

GPU_STAGES = {"pretrain-backbone", "train-model", "train-source-only", "adapt-model"}
GKE = [
    "--gpu-node-selector",
    "cloud.google.com/gke-accelerator=nvidia-l4",
    "--gpu-toleration",
    "nvidia.com/gpu=present:NoSchedule",
    "--gpus",
    "2",
]


def compiled(tmp_path: Path, pipeline: str, *flags: str) -> tuple[dict, dict, str]:
    out = tmp_path / f"{pipeline}.yaml"
    code, _, err = run_cli("compile", REPO / "pipelines" / f"{pipeline}.py", "-o", out, *flags)
    assert code == 0, err
    text = out.read_text()
    ir, platform = list(yaml.safe_load_all(text))
    return ir, platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"], text


def tasks_and_executors(ir: dict) -> dict[str, str]:
    """task name -> executor label, nested DAGs included."""
    comps = ir["components"]
    dags = [ir["root"]["dag"], *(c["dag"] for c in comps.values() if "dag" in c)]
    out = {}
    for dag in dags:
        for task in dag["tasks"].values():
            comp = comps[task["componentRef"]["name"]]
            if "executorLabel" in comp:
                out[task["taskInfo"]["name"]] = (comp["executorLabel"], task)
    return out


@pytest.mark.parametrize("pipeline", ["selfsl_then_finetune", "domain_adaptation", "supervised"])
def test_gpu_settings_only_on_gpu_stages_and_retries_everywhere(tmp_path, pipeline):
    ir, k8s, _ = compiled(tmp_path, pipeline, *GKE)
    resources = {name: e["container"].get("resources", {}) for name, e in ir["deploymentSpec"]["executors"].items()}
    found_gpu = set()
    for name, (executor, task) in tasks_and_executors(ir).items():
        assert task["retryPolicy"]["maxRetryCount"] == 3, name
        assert task["retryPolicy"]["backoffFactor"] == 2.0 and task["retryPolicy"]["backoffDuration"] == "60s"
        spec, accelerator = k8s.get(executor, {}), resources[executor].get("accelerator")
        if name in GPU_STAGES:
            found_gpu.add(name)
            assert accelerator == {"count": "2", "resourceCount": "2", "resourceType": "nvidia.com/gpu",
                                   "type": "nvidia.com/gpu"}, name  # fmt: skip
            assert spec["nodeSelector"] == {"labels": {"cloud.google.com/gke-accelerator": "nvidia-l4"}}, name
            assert spec["tolerations"] == [
                {"effect": "NoSchedule", "key": "nvidia.com/gpu", "operator": "Equal", "value": "present"}
            ], name
            assert ir["deploymentSpec"]["executors"][executor]["container"]["image"].endswith("segflow-cuda:0.1.0")
        else:
            assert accelerator is None, name
            assert "nodeSelector" not in spec and "tolerations" not in spec, name
    assert found_gpu, "the pipeline has GPU stages"


def test_images_and_requests_from_a_cluster_config_file(tmp_path):
    config = tmp_path / "onprem.yaml"
    config.write_text(
        "image: registry.local/segflow:1.2\n"
        "gpu_image: registry.local/segflow-cuda:1.2\n"
        "gpu_node_selector: {pool.example.com/kind: a100}\n"
        "gpu_tolerations: ['dedicated=ml:NoExecute']\n"
        "gpu_memory_request: 48G\n"
        "cpu_request: 500m\n"
        "retries: 5\n"
    )
    ir, k8s, _ = compiled(tmp_path, "supervised", "--cluster-config", config, "--retries", "2")
    executors = ir["deploymentSpec"]["executors"]
    for name, (executor, task) in tasks_and_executors(ir).items():
        assert task["retryPolicy"]["maxRetryCount"] == 2, "flags win over the file"
        container = executors[executor]["container"]
        if name == "train-model":
            assert container["image"] == "registry.local/segflow-cuda:1.2"
            assert container["resources"]["memoryRequest"] == 48.0
            assert k8s[executor]["nodeSelector"] == {"labels": {"pool.example.com/kind": "a100"}}
            assert k8s[executor]["tolerations"] == [
                {"effect": "NoExecute", "key": "dedicated", "operator": "Equal", "value": "ml"}
            ]
        else:
            assert container["image"] == "registry.local/segflow:1.2", name
            assert container["resources"]["cpuRequest"] == 0.5, name


def test_compiled_yaml_holds_no_credentials(tmp_path, monkeypatch):
    secrets = {
        "AWS_ACCESS_KEY_ID": "AKIAEXAMPLEKEY123456",
        "AWS_SECRET_ACCESS_KEY": "wJalrXUtnFEMIexamplesecretkey",
        "AWS_SESSION_TOKEN": "session-token-value-xyz",
        "MLFLOW_TRACKING_URI": "https://admin:hunter2pass@mlflow.example.com",
        "MLFLOW_TRACKING_TOKEN": "mlflow-token-abc",
        "KF_PIPELINES_SA_TOKEN_PATH": "/var/run/secret-token-path",
    }
    for key, value in secrets.items():
        monkeypatch.setenv(key, value)
    for pipeline in ("selfsl_then_finetune", "domain_adaptation"):
        _, _, text = compiled(tmp_path, pipeline, *GKE)
        for value in (*secrets.values(), "hunter2pass"):
            assert value not in text, f"{value} leaked into {pipeline}.yaml"
        assert "segflow-s3" in text and "segflow-mlflow" in text  # credentials come from secrets


def test_bad_settings_fail_clearly(tmp_path):
    for flags, message in [
        (["--gpu-toleration", "nvidia.com/gpu"], "KEY\\[=VALUE\\]:EFFECT"),
        (["--gpu-toleration", "nvidia.com/gpu:Sometimes"], "NoSchedule"),
        (["--gpu-node-selector", "no-equals-sign"], "KEY=VALUE"),
        (["--gpus", "0"], "--gpus 0 must be between 1 and 64"),
        (["--memory-request", "lots"], "Kubernetes quantity"),
        (["--cluster-config", tmp_path / "missing.yaml"], "does not exist"),
    ]:
        code, _, err = run_cli("compile", REPO / "pipelines" / "supervised.py", "-o", tmp_path / "p.yaml", *flags)
        assert code == 2 and "Traceback" not in err, (flags, err)
        assert re.search(message, err), (flags, err)
    assert not (tmp_path / "p.yaml").exists()
    bad = tmp_path / "bad.yaml"
    bad.write_text("gpus: 2\nnode_selector: {a: b}\n")
    with pytest.raises(SegflowError, match=r"unknown settings \['node_selector'\]"):
        cluster.load(bad)
    bad.write_text("gpus: two\n")
    with pytest.raises(SegflowError, match="whole number"):
        cluster.load(bad)


@pytest.mark.parametrize("example", sorted((REPO / "docs" / "cluster").glob("*.yaml")), ids=lambda p: p.name)
def test_documented_cluster_configs_load(example):
    config = cluster.load(example)
    assert config.gpu_node_selector and config.gpus >= 1
