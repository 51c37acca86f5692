"""Shared fixtures: an isolated SEGFLOW_HOME per test, tiny synthetic datasets, a real S3 server."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from segflow.data.synth import synthesize
from segflow.results import EvaluateResult, ExportResult, ImportResult, PredictResult, PretrainResult, TrainResult

REPO = Path(__file__).resolve().parents[1]


def pytest_configure(config) -> None:
    """Under pytest-xdist, the workers share the cores: torch gets its share of threads each, and
    so does every process a test starts (kfp.local tasks, torchrun, the CLI) through
    OMP_NUM_THREADS; with torch's default of every core, the two workers' processes fight over them."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if workers > 1:
        import torch

        from segflow.parallel import cpu_count

        share = max(1, cpu_count() // workers)
        os.environ.setdefault("OMP_NUM_THREADS", str(share))
        torch.set_num_threads(share)


def pytest_collection_modifyitems(config, items) -> None:
    """The slow tests first (in their collected order), so that pytest-xdist's workers, handed one
    test at a time (--maxschedchunk=1 in the Makefile), do not end with one long test alone."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)


@pytest.fixture(autouse=True)
def _no_log_handler_on_a_closed_stream(request):
    """Tests run pipelines and the CLI in this process, under redirected output. A log handler
    left on a stream that the test then closed makes every later test's logging print
    "--- Logging error ---" into the output it checks (kfp.local's parallel tasks once left one:
    see orchestration._runner_logs_to). The test that leaves one fails; the handler is removed."""
    import logging

    yield
    loggers = [logging.getLogger()] + [
        lg for lg in logging.Logger.manager.loggerDict.values() if isinstance(lg, logging.Logger)
    ]
    left = []
    for logger in loggers:
        for handler in list(logger.handlers):
            if getattr(getattr(handler, "stream", None), "closed", False):
                logger.removeHandler(handler)
                left.append(f"{handler!r} on logger {logger.name!r}")
    if left:
        pytest.fail(f"{request.node.nodeid} left log handlers on closed streams: {left}")


@pytest.fixture(autouse=True)
def segflow_home(tmp_path_factory, monkeypatch) -> Path:
    """Every test tracks into its own SQLite store, never into the checkout's runs/."""
    home = tmp_path_factory.mktemp("segflow_home")
    monkeypatch.setenv("SEGFLOW_HOME", str(home))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("SEGFLOW_EXPERIMENT", raising=False)
    return home


@pytest.fixture(scope="session")
def _source_template(tmp_path_factory) -> Path:
    return synthesize(tmp_path_factory.mktemp("tpl") / "source", "source", num_images=12, size=48, seed=0)


@pytest.fixture
def css_dataset(tmp_path, _source_template) -> Path:
    """A fresh copy of a 12-image, 48 px Common Semantic Segmentation dataset (safe to break)."""
    return Path(shutil.copytree(_source_template, tmp_path / "css"))


@pytest.fixture(scope="session")
def s3_endpoint():
    """moto's S3 server: a real HTTP endpoint on 127.0.0.1."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


@pytest.fixture
def s3(s3_endpoint, monkeypatch):
    """boto3 pointed at the local S3 server through the standard AWS variables; a fresh bucket."""
    import uuid

    from segflow.storage import s3 as s3_lib

    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_endpoint)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    for var in ("AWS_PROFILE", "AWS_SESSION_TOKEN"):
        monkeypatch.delenv(var, raising=False)
    s3_lib.client.cache_clear()
    bucket = f"b-{uuid.uuid4().hex[:12]}"
    s3_lib.client().create_bucket(Bucket=bucket)
    yield bucket
    s3_lib.client.cache_clear()


def listing(folder: Path) -> list[str]:
    """Every entry below ``folder`` (hidden ones too), relative, sorted."""
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*")) if folder.exists() else []


# The stages with tracking off: what most tests run (tests/test_tracking.py covers MLflow).
def run_import(src, out, **settings) -> ImportResult:
    from segflow.data.importer import ImportConfig
    from segflow.stages import import_stage

    return import_stage(ImportConfig(source=str(src), out=str(out), **settings), track=False)


def run_train(cfg) -> TrainResult:
    from segflow.stages import train_stage

    return train_stage(cfg, track=False)


def run_pretrain(cfg) -> PretrainResult:
    from segflow.stages import pretrain_stage

    return pretrain_stage(cfg, track=False)


def run_evaluate(cfg) -> EvaluateResult:
    from segflow.stages import evaluate_stage

    return evaluate_stage(cfg, track=False)


def run_export(cfg) -> ExportResult:
    from segflow.stages import export_stage

    return export_stage(cfg, track=False)


def run_predict(cfg) -> PredictResult:
    from segflow.stages import predict_stage

    return predict_stage(cfg)


@pytest.fixture(scope="session")
def tiny(tmp_path_factory) -> dict[str, Path]:
    """One tiny trained model for the whole session (lite_hrnet_s, 64 px, 24 target scenes, 8 x 6 steps):
    `data` (imported dataset), `model`, `images` (the raw images), `raw` (the raw dataset)."""
    from segflow.train.config import TrainConfig

    root = tmp_path_factory.mktemp("tiny")
    raw = synthesize(root / "raw", "target", num_images=24, size=64, seed=21)
    run_import(raw, root / "ds", val_fraction=0.25)
    summary = run_train(
        TrainConfig(
            data=str(root / "ds"),
            out=str(root / "model"),
            input_size=64,
            batch_size=4,
            epochs=8,
            iters_per_epoch=6,
            early_stop_patience=100,
        )
    )
    return {
        "root": root,
        "raw": raw,
        "data": root / "ds",
        "model": root / "model",
        "images": raw / "images",
        "summary": summary,
    }


@pytest.fixture(scope="session")
def tiny_ir(tiny, tmp_path_factory) -> dict:
    """The session model exported once to an FP32 IR (parity-checked on its val images):
    `ir` (the folder) and `report` (export_report.json)."""
    from segflow.export.openvino_ir import ExportConfig

    out = tmp_path_factory.mktemp("tiny_ir") / "ir"
    report = run_export(ExportConfig(model=str(tiny["model"]), out=str(out), calibration=str(tiny["data"])))
    return {"ir": out, "report": report}


def run_cli(*args) -> tuple[int, str, str]:
    """`segflow ARGS` in this process: (exit code, stdout, stderr). Faster than a subprocess,
    and the same code path as the installed command (segflow_kfp.cli.main)."""
    import contextlib
    import io

    from segflow_kfp import cli

    out, err = io.StringIO(), io.StringIO()
    code = 0
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            cli.main([str(a) for a in args])
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    return code, out.getvalue(), err.getvalue()
