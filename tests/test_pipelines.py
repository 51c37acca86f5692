"""Every pipeline compiles to valid KFP IR; pipelines run end to end with the real kfp.local runner."""

from __future__ import annotations

import io
import json
import logging
import os
import re
from pathlib import Path

import mlflow
import pytest
import yaml
from conftest import REPO, run_cli

from segflow import tracking
from segflow.data import manifest as manifest_lib
from segflow.data.synth import synthesize
from segflow.errors import SegflowError
from segflow_kfp import orchestration

PIPELINES = sorted((REPO / "pipelines").glob("*.py"))


def compile_ir(path: Path, tmp_path: Path) -> tuple[dict, dict]:
    out = orchestration.compile_pipeline(path, tmp_path / f"{path.stem}.yaml")
    docs = list(yaml.safe_load_all(out.read_text()))
    return docs[0], (docs[1] if len(docs) > 1 else {})


def all_tasks(ir: dict) -> dict[str, dict]:
    """Every task of the pipeline, nested DAGs (exit handlers, conditions) included."""
    tasks = dict(ir["root"]["dag"]["tasks"])
    for comp in ir["components"].values():
        tasks.update(comp.get("dag", {}).get("tasks", {}))
    return tasks


@pytest.mark.parametrize("path", PIPELINES, ids=lambda p: p.name)
def test_every_pipeline_compiles_with_project_image_and_platform_settings(path, tmp_path):
    ir, platform = compile_ir(path, tmp_path)
    # Importers (retrain's run-time URIs) run no container of ours.
    executors = {k: v for k, v in ir["deploymentSpec"]["executors"].items() if "importer" not in v}
    assert executors
    for name, executor in executors.items():
        container = executor["container"]
        assert container["image"].startswith("ghcr.io/segflow/"), name
        assert "pip install" not in " ".join(container["command"]), f"{name} would pip-install at start"
    k8s = platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    for name in executors:
        secrets = {s["secretName"] for s in k8s[name].get("secretAsEnv", [])}
        assert {"segflow-mlflow", "segflow-s3"} <= secrets, name


def test_prepare_data_ir_has_typed_artifacts_and_edges(tmp_path):
    ir, _ = compile_ir(REPO / "pipelines" / "prepare_data.py", tmp_path)
    outputs = ir["components"]["comp-import-data"]["outputDefinitions"]["artifacts"]
    assert {k: v["artifactType"]["schemaTitle"] for k, v in outputs.items()} == {
        "dataset": "system.Dataset",
        "report": "system.Markdown",
        "metrics": "system.Metrics",
    }
    tasks = all_tasks(ir)
    assert {"import-data", "import-data-2", "finish-tracking"} <= set(tasks)
    assert tasks["finish-tracking"]["triggerPolicy"]["strategy"] == "ALL_UPSTREAM_TASKS_COMPLETED"
    assert tasks["finish-tracking"]["dependentTasks"] == ["exit-handler-1"]
    for name in ("import-data", "import-data-2"):
        params = tasks[name]["inputs"]["parameters"]
        assert params["run_key"]["runtimeValue"]["constant"] == "{{$.pipeline_job_uuid}}"
        assert tasks[name]["cachingOptions"].get("enableCache") is not True, "imports must not be cached"


def test_params_are_checked_and_typed():
    pipeline = orchestration.load_pipeline(REPO / "pipelines" / "prepare_data.py")
    assert orchestration.parse_params(pipeline, ["seed=3", "val_fraction=0.5"]) == {"seed": 3, "val_fraction": 0.5}
    with pytest.raises(SegflowError, match="not a parameter"):
        orchestration.parse_params(pipeline, ["epochs=3"])
    with pytest.raises(SegflowError, match="number_integer"):
        orchestration.parse_params(pipeline, ["seed=three"])
    with pytest.raises(SegflowError, match="KEY=VALUE"):
        orchestration.parse_params(pipeline, ["seed"])


def test_load_pipeline_errors(tmp_path):
    with pytest.raises(SegflowError, match="does not exist"):
        orchestration.load_pipeline(tmp_path / "none.py")
    (tmp_path / "empty.py").write_text("x = 1\n")
    with pytest.raises(SegflowError, match="exactly one"):
        orchestration.load_pipeline(tmp_path / "empty.py")
    (tmp_path / "broken.py").write_text("import not_a_module_anywhere\n")
    with pytest.raises(SegflowError, match="failed to load"):
        orchestration.load_pipeline(tmp_path / "broken.py")


@pytest.mark.slow
def test_prepare_data_runs_locally_and_is_tracked(tmp_path, segflow_home):
    source = synthesize(tmp_path / "source", "source", num_images=8, size=48, seed=0)
    target = synthesize(tmp_path / "target", "target", num_images=8, size=48, seed=1)
    pipeline = REPO / "pipelines" / "prepare_data.py"
    code, out, err = run_cli("run", pipeline, "--local", "-p", f"source_uri={source}", "-p", f"target_uri={target}")
    assert code == 0, err
    # What a person sees: a line per task with its headline figure, and where everything is.
    lines = out.splitlines()
    assert len(lines) <= 12, out
    assert sum(line.startswith("  ok ") for line in lines) == 3 and "images_train 6" in out
    log = next(line.split("full log: ")[1] for line in lines if "full log: " in line)
    assert "Executing task" in Path(log).read_text(), "the runner's own output goes to the log file"
    result = {"job_dir": next(p for p in (segflow_home / "kfp").iterdir())}
    result["artifacts"] = {p.name for p in result["job_dir"].iterdir()}
    assert result["artifacts"] == {"import-data", "import-data-2", "finish-tracking"}
    result["mlflow_run_id"] = next(line.split()[3] for line in lines if "MLflow:" in line)
    manifests = sorted((segflow_home / "kfp").rglob("manifest.json"))
    assert len(manifests) == 2
    assert {manifest_lib.read(m.parent)["source"]["uri"] for m in manifests} == {str(source), str(target)}
    reports = list((segflow_home / "kfp").rglob("report"))
    assert reports and all("# Dataset import report" in r.read_text() for r in reports)
    mlflow.set_tracking_uri(tracking.tracking_uri())
    runs = mlflow.search_runs(experiment_names=["segflow"], output_format="list")
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    assert parents[0].info.run_id == result["mlflow_run_id"]
    assert parents[0].info.run_name == result["job_dir"].name
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parents[0].info.run_id]
    assert sorted(r.info.run_name for r in children) == ["import source", "import target"]


@pytest.mark.slow
def test_failing_pipeline_marks_the_parent_failed(tmp_path, segflow_home):
    source = synthesize(tmp_path / "source", "source", num_images=4, size=48, seed=0)
    (tmp_path / "target").mkdir()
    with pytest.raises(SegflowError, match="failed"):
        orchestration.run_local(
            REPO / "pipelines" / "prepare_data.py", {"source_uri": str(source), "target_uri": str(tmp_path / "target")}
        )
    mlflow.set_tracking_uri(tracking.tracking_uri())
    runs = mlflow.search_runs(experiment_names=["segflow"], output_format="list")
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    assert [p.info.status for p in parents] == ["FAILED"]


def test_supervised_ir_wires_import_train_evaluate(tmp_path):
    ir, platform = compile_ir(REPO / "pipelines" / "supervised.py", tmp_path)
    tasks = all_tasks(ir)
    assert tasks["train-model"]["dependentTasks"] == ["import-data"]
    assert sorted(tasks["evaluate-model"]["dependentTasks"]) == ["import-data", "train-model"]
    artifacts = tasks["evaluate-model"]["inputs"]["artifacts"]
    assert artifacts["model"]["taskOutputArtifact"] == {"outputArtifactKey": "model", "producerTask": "train-model"}
    evaluate_out = ir["components"]["comp-evaluate-model"]["outputDefinitions"]["artifacts"]
    assert evaluate_out["confusion"]["artifactType"]["schemaTitle"] == "system.ClassificationMetrics"
    train_out = ir["components"]["comp-train-model"]["outputDefinitions"]["artifacts"]
    assert train_out["model"]["artifactType"]["schemaTitle"] == "system.Model"
    train_exec = ir["deploymentSpec"]["executors"]["exec-train-model"]["container"]
    assert train_exec["resources"]["accelerator"]["resourceType"] == "nvidia.com/gpu"
    k8s = platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]["exec-train-model"]
    assert "nodeSelector" not in k8s  # clusters label GPU pools their own way: --gpu-node-selector


@pytest.mark.slow
def test_supervised_pipeline_runs_locally(tmp_path, segflow_home):
    data = synthesize(tmp_path / "target", "target", num_images=12, size=64, seed=2)
    result = orchestration.run_local(
        REPO / "pipelines" / "supervised.py",
        {"data_uri": str(data), "epochs": 2, "input_size": 64, "batch_size": 4, "tile": 32},
    )
    evaluation = result["job_dir"] / "evaluate-model" / "evaluation"
    tiling = {"size": 32, "overlap": 0.25, "scale": 1.0}  # chosen in the pipeline, carried to the IR
    assert json.loads((result["job_dir"] / "train-model" / "model" / "config.json").read_text())["tiling"] == tiling
    assert json.loads((result["job_dir"] / "export-model" / "ir" / "config.json").read_text())["tiling"] == tiling
    metrics = json.loads((evaluation / "metrics.json").read_text())
    assert 0 <= metrics["mDice"] <= 1 and (evaluation / "predictions.png").exists()
    assert (result["job_dir"] / "train-model" / "model" / "model.safetensors").exists()
    mlflow.set_tracking_uri(tracking.tracking_uri())
    runs = mlflow.search_runs(experiment_names=["segflow"], output_format="list")
    names = sorted(r.info.run_name for r in runs if r.data.tags.get("mlflow.parentRunId") == result["mlflow_run_id"])
    assert names == [
        "evaluate val",
        "export fp32",
        "import target",
        "register segflow",
        "train lite_hrnet_s supervised",
    ]
    ir_meta = json.loads((result["job_dir"] / "export-model" / "executor_output.json").read_text())
    assert ir_meta["artifacts"]["ir"]["artifacts"][0]["metadata"]["parity_passed"] is True

    # The parent run is what the MLflow UI compares: parameters, headline metrics, tags, inputs, model.
    client = mlflow.MlflowClient()
    parent = client.get_run(result["mlflow_run_id"])
    assert parent.info.status == "FINISHED"
    assert parent.data.params["data_uri"] == str(data) and parent.data.params["epochs"] == "2"
    headline = parent.data.metrics
    assert headline["val_mDice"] == pytest.approx(metrics["mDice"])
    assert headline["val_mIoU"] == pytest.approx(metrics["mIoU"])
    for name, scores in metrics["per_class"].items():
        if scores["dice"] is not None:
            assert headline[f"val_dice_{name}"] == pytest.approx(scores["dice"])
    assert headline["export_latency_ms"] > 0 and headline["train_seconds"] > 0
    assert parent.data.tags["segflow.pipeline"] == "supervised" and parent.data.tags["segflow.version"]
    fingerprint = metrics["dataset_fingerprint"]
    assert parent.data.tags["segflow.dataset_fingerprint.training"] == fingerprint
    inputs = {(i.dataset.name, i.dataset.digest, i.tags[0].value) for i in parent.inputs.dataset_inputs}
    # One dataset artifact (its train subset trains, its val subset scores): one input, as MLflow
    # keeps a dataset once per run, with the context it was first logged in.
    assert inputs == {("target", fingerprint[:32], "training")}
    models = parent.outputs.model_outputs
    assert len(models) == 1 and client.get_logged_model(models[0].model_id).name == "model"
    experiment = client.get_experiment(parent.info.experiment_id)
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"


def test_selfsl_then_finetune_ir(tmp_path):
    ir, _ = compile_ir(REPO / "pipelines" / "selfsl_then_finetune.py", tmp_path)
    tasks = all_tasks(ir)
    assert tasks["pretrain-backbone"]["dependentTasks"] == ["pseudo-masks"]
    assert sorted(tasks["train-model"]["dependentTasks"]) == ["import-data", "pretrain-backbone"]
    backbone = tasks["train-model"]["inputs"]["artifacts"]["init_backbone"]["taskOutputArtifact"]
    assert backbone == {"outputArtifactKey": "backbone", "producerTask": "pretrain-backbone"}
    train_inputs = ir["components"]["comp-train-model"]["inputDefinitions"]["artifacts"]
    assert train_inputs["init_backbone"]["isOptional"] is True


@pytest.mark.slow
def test_selfsl_then_finetune_runs_locally(tmp_path, segflow_home):
    data = synthesize(tmp_path / "target", "target", num_images=12, size=64, seed=2)
    unlabeled = synthesize(tmp_path / "unl", "target", num_images=8, size=64, seed=3, unlabeled=True)
    params = {
        "data_uri": str(data),
        "unlabeled_uri": str(unlabeled),
        "epochs": 1,
        "input_size": 64,
        "batch_size": 4,
        "pretrain_epochs": 1,
        "pretrain_batch_size": 4,
        "pretrain_iters_per_epoch": 1,  # one pass (auto repeats small sets to 50 steps an epoch)
        "finetune_method": "supcon",
    }  # Felzenszwalb parameters, pretraining view size and lr: auto
    shown = io.StringIO()
    result = orchestration.run_local(REPO / "pipelines" / "selfsl_then_finetune.py", params, show=shown)
    assert (result["job_dir"] / "pretrain-backbone" / "backbone" / "backbone.safetensors").exists()
    # Each task's line carries its headline figure, also when the run made the pipeline root's
    # checkpoints/ folder (a newer folder than the run's own).
    assert re.search(r"pretrain-backbone .* final_loss \d", shown.getvalue()), shown.getvalue()
    summary = json.loads((result["job_dir"] / "train-model" / "model" / "training.json").read_text())
    assert summary["config"]["init_backbone"].endswith("backbone") and summary["objective"] == "supcon"
    mlflow.set_tracking_uri(tracking.tracking_uri())
    runs = mlflow.search_runs(experiment_names=["segflow"], output_format="list")
    names = sorted(r.info.run_name for r in runs if r.data.tags.get("mlflow.parentRunId") == result["mlflow_run_id"])
    assert names == [
        "evaluate val",
        "export fp32",
        "import target",
        "pretrain lite_hrnet_s detcon",
        "pseudo_masks",
        "register segflow",
        "train lite_hrnet_s supcon",
    ]
    # What "auto" chose is on the stage runs: the size rule for 64 px images.
    by_name = {r.info.run_name: r for r in runs if r.data.tags.get("mlflow.parentRunId") == result["mlflow_run_id"]}
    masks = by_name["pseudo_masks"].data.params
    assert float(masks["auto.felzenszwalb.scale"]) > 0 and int(masks["auto.felzenszwalb.min_size"]) > 0
    assert masks["auto.felzenszwalb_rule"].startswith("size rule for 64 px images x"), masks
    assert 10 <= float(masks["auto.segments_per_image"]) <= 32, masks
    pretrain = by_name["pretrain lite_hrnet_s detcon"].data.params
    assert pretrain["auto.input_size"] == "64" and pretrain["auto.lr"] == "0.05"
    assert pretrain["auto.felzenszwalb_rule"] == "those of the masks already made"


def test_domain_adaptation_ir_runs_branches_in_parallel(tmp_path):
    ir, _ = compile_ir(REPO / "pipelines" / "domain_adaptation.py", tmp_path)
    tasks = all_tasks(ir)
    loop = next(t for name, t in tasks.items() if name.startswith("for-loop"))
    assert loop["parameterIterator"]["items"]["inputParameter"] == "pipelinechannel--branches"
    assert {"adapt-model", "evaluate-model-2"} <= set(tasks)
    choose = tasks["choose-best"]["inputs"]["artifacts"]
    assert set(choose) >= {"adapted", "adapted_evaluations", "ensemble", "source_only"}
    adapt_exec = ir["deploymentSpec"]["executors"]["exec-adapt-model"]["container"]
    assert adapt_exec["resources"]["accelerator"]["resourceType"] == "nvidia.com/gpu"


@pytest.mark.slow
def test_domain_adaptation_pipeline_runs_locally(tmp_path, segflow_home):
    """Two branches (the ensemble's members) to keep it short; every candidate evaluated beside the
    source-only model, the best exported, the comparison on the parent run."""
    source = synthesize(tmp_path / "source", "source", num_images=10, size=64, seed=40)
    target = synthesize(tmp_path / "target", "target", num_images=10, size=64, seed=41)
    params = {
        "source_uri": str(source),
        "target_uri": str(target),
        "branches": [{"method": "minent", "levels": "single"}, {"method": "advent", "levels": "single"}],
        "epochs": 1,
        "iters_per_epoch": 2,
        "iterations": 2,
        "eval_every": 2,
        "batch_size": 4,
    }
    handlers = logging.getLogger().handlers[:]
    result = orchestration.run_local(REPO / "pipelines" / "domain_adaptation.py", params)
    # Parallel branches swap the root logger's handlers from several threads; the run puts back its own.
    assert logging.getLogger().handlers == handlers
    job = result["job_dir"]
    chosen = json.loads((job / "choose-best" / "executor_output.json").read_text())
    best = chosen["artifacts"]["best"]["artifacts"][0]["metadata"]["candidate"]
    assert best in {"source-only", "minent", "advent", "minent+advent"}
    evaluations = sorted(job.glob("**/evaluate-model*/evaluation/comparison.png"))
    assert len(evaluations) == 3, "the two branches and the ensemble, pictured beside the source-only model"
    assert (job / "export-model" / "ir" / "model.xml").exists()
    client = mlflow.MlflowClient(tracking.tracking_uri())
    artifacts = {a.path for a in client.list_artifacts(result["mlflow_run_id"], "comparison")}
    assert {"comparison/comparison.md", "comparison/comparison.png"} <= artifacts
    # The chosen model is registered like any export, with the target's validation fingerprint.
    version = client.get_model_version_by_alias("segflow", "challenger")
    assert version.tags["segflow.pipeline_run"] and version.tags["segflow.validation_fingerprint"]


def test_parallel_branches_get_one_thread_per_task(monkeypatch):
    """Only a pipeline with a ParallelFor gives its tasks one torch thread; a user's own setting
    stays, and nothing is left in the environment afterwards."""
    parallel = orchestration.load_pipeline(REPO / "pipelines" / "domain_adaptation.py", orchestration.LOCAL)
    sequential = orchestration.load_pipeline(REPO / "pipelines" / "selfsl_then_finetune.py", orchestration.LOCAL)
    assert orchestration.has_parallel_branches(parallel)
    assert not orchestration.has_parallel_branches(sequential)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    with orchestration._one_thread_per_task():
        assert os.environ["OMP_NUM_THREADS"] == "1"
    assert "OMP_NUM_THREADS" not in os.environ
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    with orchestration._one_thread_per_task():
        assert os.environ["OMP_NUM_THREADS"] == "3"
    assert os.environ["OMP_NUM_THREADS"] == "3"
