"""Shared fixtures: an isolated SEGFLOW_HOME per test, tiny synthetic datasets, a real S3 server."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from segflow.data.synth import synthesize

REPO = Path(__file__).resolve().parents[1]


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
