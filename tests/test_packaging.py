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
    # The MLflow server runs segflow's image: the clients' MLflow pin, with boto3 and psycopg2.
    assert values["mlflow"]["image"] == f"ghcr.io/segflow/segflow:{chart['appVersion']}"
    templates = {p.name for p in (REPO / "charts/segflow/templates").iterdir()}
    assert {"mlflow.yaml", "secrets.yaml", "kfp-launcher.yaml"} <= templates
    # The secret names the components read must be the ones the chart creates.
    secrets = (REPO / "charts/segflow/templates/secrets.yaml").read_text()
    platform = (REPO / "segflow_kfp/platform.py").read_text()
    read = re.findall(r'"(segflow-[a-z0-9]+)"', platform)
    assert sorted(read) == ["segflow-mlflow", "segflow-s3"], read
    for name in read:
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


def test_cpu_and_cuda_images_come_from_the_same_pins_and_run_as_non_root():
    dockerfile = (REPO / "images/Dockerfile").read_text()
    install = [line for line in dockerfile.splitlines() if "pip install" in line]
    assert install and all("-c constraints.txt" in line for line in install)
    assert "TORCH_INDEX" in install[0]  # the only difference between the CPU and the CUDA image
    assert re.search(r"^USER 10001$", dockerfile, re.M)
    for folder in ("segflow", "segflow_kfp"):  # pyproject.toml installs both
        assert re.search(rf"^COPY {folder} ", dockerfile, re.M), folder


def test_every_package_is_installed():
    """setuptools finds the packages under the two names pyproject.toml includes; a folder of code
    without __init__.py would be left out of installs (the image), so there must be none."""
    import setuptools

    include = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]["find"]["include"]
    found = set(setuptools.find_packages(str(REPO), include=include))
    folders = {
        ".".join(p.parent.relative_to(REPO).parts)
        for root in ("segflow", "segflow_kfp")
        for p in REPO.glob(f"{root}/**/*.py")
    }
    assert {"segflow", "segflow.train", "segflow_kfp"} <= found
    assert folders == found, f"code folders without __init__.py: {sorted(folders - found)}"


def test_declared_dependencies_match_imports():
    """Every third-party module the code imports is declared, and every declared one is used."""
    import ast

    declared = {
        re.split(r"[<>=!\[ ]", d, maxsplit=1)[0].lower()
        for d in tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    }
    imported: set[str] = set()
    for path in [*REPO.glob("segflow/**/*.py"), *REPO.glob("segflow_kfp/*.py"), *REPO.glob("pipelines/*.py")]:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                imported |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                imported.add(node.module.split(".")[0])
    distribution = {  # import name -> distribution name, where they differ
        "PIL": "pillow",
        "cv2": "opencv-python-headless",
        "skimage": "scikit-image",
        "yaml": "pyyaml",
        "google": "protobuf",
    }
    import sys

    third_party = {
        distribution.get(m, m).lower().replace("_", "-")
        for m in imported - set(sys.stdlib_module_names) - {"segflow", "segflow_kfp", "__future__"}
    }
    # kfp-kubernetes installs into the kfp namespace (`from kfp import kubernetes`).
    assert third_party - declared == set()
    assert declared - third_party - {"kfp-kubernetes"} == set()
