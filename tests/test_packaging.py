"""What ships beside the code: the chart's files parse, the image lints, pins cover the deps."""

from __future__ import annotations

import re
import shutil
import subprocess
import tomllib

import pytest
import yaml
from conftest import REPO


def test_chart_metadata_and_values_parse():
    chart = yaml.safe_load((REPO / "charts/segflow/Chart.yaml").read_text())
    assert chart["apiVersion"] == "v2" and chart["name"] == "segflow"
    values = yaml.safe_load((REPO / "charts/segflow/values.yaml").read_text())
    assert values["mlflow"]["image"].endswith(":v3.17.2")
    templates = {p.name for p in (REPO / "charts/segflow/templates").iterdir()}
    assert {"mlflow.yaml", "secrets.yaml"} <= templates
    # The secret names the components read must be the ones the chart creates.
    secrets = (REPO / "charts/segflow/templates/secrets.yaml").read_text()
    platform = (REPO / "components/platform.py").read_text()
    for name in re.findall(r'"(segflow-[a-z0-9]+)"', platform):
        assert f"name: {name}" in secrets


def test_every_dependency_is_pinned():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    wanted = project["dependencies"] + project["optional-dependencies"]["dev"]
    pins = {
        line.split("==")[0].lower().replace("_", "-")
        for line in (REPO / "constraints.txt").read_text().splitlines()
        if "==" in line
    }
    for requirement in wanted:
        name = re.split(r"[<>=!\[ ]", requirement, maxsplit=1)[0].lower().replace("_", "-")
        assert name in pins, f"{name} is not pinned in constraints.txt"


@pytest.mark.skipif(
    shutil.which("hadolint") is None and not (REPO / ".venv/bin/hadolint").exists(), reason="hadolint not installed"
)
def test_dockerfile_lints():
    hadolint = shutil.which("hadolint") or str(REPO / ".venv/bin/hadolint")
    result = subprocess.run([hadolint, str(REPO / "images/Dockerfile")], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
