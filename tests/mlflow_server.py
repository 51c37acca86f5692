"""A real `mlflow server` on loopback for tests: PostgreSQL backend store when one answers on
127.0.0.1:5432 (the project's machines run one), else SQLite; artifacts proxied to an S3 endpoint."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from contextlib import contextmanager
from pathlib import Path


def postgres_uri() -> str | None:
    """A fresh, empty database on the local PostgreSQL, or None when there is none."""
    try:
        import psycopg2
    except ImportError:
        return None
    name = f"mlflow_{uuid.uuid4().hex[:10]}"
    try:
        conn = psycopg2.connect(host="127.0.0.1", port=5432, user="root", dbname="postgres", connect_timeout=3)
    except psycopg2.Error:
        return None
    conn.autocommit = True
    with conn.cursor() as cur:
        cur.execute(f"CREATE DATABASE {name}")
    conn.close()
    return f"postgresql+psycopg2://root@127.0.0.1:5432/{name}"  # SQLAlchemy 2.1 defaults to psycopg 3


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def mlflow_server(tmp: Path, s3_endpoint: str, bucket: str):
    """Yield (tracking URI, backend store URI) of a running server; stopped afterwards."""
    backend = postgres_uri() or f"sqlite:///{tmp / 'mlflow.db'}"
    port = _free_port()
    env = {
        **os.environ,
        "MLFLOW_S3_ENDPOINT_URL": s3_endpoint,
        "AWS_ENDPOINT_URL": s3_endpoint,
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
    }
    command = [
        str(Path(sys.executable).with_name("mlflow")),
        "server",
        "--host=127.0.0.1",
        f"--port={port}",
        f"--backend-store-uri={backend}",
        "--serve-artifacts",
        f"--artifacts-destination=s3://{bucket}/mlflow",
        "--workers=1",
    ]
    log = open(tmp / "mlflow-server.log", "w")  # noqa: SIM115 (closed below)
    proc = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    uri = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                with urllib.request.urlopen(f"{uri}/health", timeout=2) as answer:
                    if answer.status == 200:
                        break
            except OSError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("mlflow server did not start:\n" + (tmp / "mlflow-server.log").read_text()[-3000:])
            time.sleep(0.5)
        yield uri, backend
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, 15)
            proc.wait(timeout=30)
        log.close()
