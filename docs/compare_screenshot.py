"""Take the README's screenshots of MLflow comparing two real pipeline runs.

    .venv/bin/python docs/compare_screenshot.py     # needs Debian's chromium (apt-get install chromium)

Starts `mlflow server` on loopback (SQLite, artifacts in a temporary folder), runs the supervised
pipeline twice with kfp.local on synthetic scenes (plain supervised vs SupCon), then has headless
Chromium photograph the experiment's runs table and the compare view of the two parent runs:
docs/mlflow_runs.png and docs/mlflow_compare.png.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(url: str, seconds: float = 120) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except OSError:
            time.sleep(0.5)
    raise SystemExit(f"{url} did not answer")


def shoot(browser: str, url: str, out: Path, size: str = "1600,1000") -> None:
    with tempfile.TemporaryDirectory() as profile:
        subprocess.run(
            [
                browser, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                f"--user-data-dir={profile}", f"--window-size={size}", "--virtual-time-budget=20000",
                f"--screenshot={out}", url,
            ],
            check=True, capture_output=True, timeout=180,
        )  # fmt: skip
    print(f"wrote {out}")


def main() -> None:
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        raise SystemExit("needs chromium: apt-get install chromium")
    with tempfile.TemporaryDirectory(prefix="segflow-shot-") as tmp:
        tmp = Path(tmp)
        port = free_port()
        uri = f"http://127.0.0.1:{port}"
        server = subprocess.Popen(
            [
                str(Path(sys.executable).with_name("mlflow")), "server", "--host=127.0.0.1", f"--port={port}",
                f"--backend-store-uri=sqlite:///{tmp / 'mlflow.db'}", f"--artifacts-destination={tmp / 'artifacts'}",
                "--workers=1",
            ],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
        )  # fmt: skip
        try:
            wait_for(f"{uri}/health")
            env = {**os.environ, "MLFLOW_TRACKING_URI": uri, "SEGFLOW_HOME": str(tmp / "home")}
            subprocess.run(
                [str(Path(sys.executable).with_name("segflow")), "data", "synth", str(tmp / "scenes"),
                 "--domain", "target", "--num-images", "40", "--size", "96", "--seed", "5"],
                check=True, env=env,
            )  # fmt: skip
            for method in ("supervised", "supcon"):
                subprocess.run(
                    [str(Path(sys.executable).with_name("segflow")), "run", str(REPO / "pipelines/supervised.py"),
                     "--local", "-p", f"data_uri={tmp / 'scenes'}", "-p", f"method={method}", "-p", "epochs=6",
                     "-p", "registered_model=street-scenes"],
                    check=True, env=env,
                )  # fmt: skip
            import mlflow

            client = mlflow.MlflowClient(uri)
            experiment = client.get_experiment_by_name("segflow")
            parents = client.search_runs(
                [experiment.experiment_id], "tags.`segflow.pipeline` = 'supervised'", order_by=["start_time ASC"]
            )
            ids = [r.info.run_id for r in parents][-2:]
            shoot(browser, f"{uri}/#/experiments/{experiment.experiment_id}/runs", HERE / "mlflow_runs.png", "1600,900")
            query = urllib.parse.urlencode(
                {"runs": json.dumps(ids), "experiments": json.dumps([experiment.experiment_id])}
            )
            shoot(browser, f"{uri}/#/compare-runs?{query}", HERE / "mlflow_compare.png", "1600,2600")
        finally:
            server.terminate()
            server.wait(timeout=30)


if __name__ == "__main__":
    main()
