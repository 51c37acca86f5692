"""Load, compile and run the pipelines in ``pipelines/``.

``run_local`` uses kfp.local's SubprocessRunner (no containers, no venv per task): every task
runs as a subprocess of this Python, so the installed segflow is the code that runs.
"""

from __future__ import annotations

import importlib.util
import os
import sys
import warnings
from pathlib import Path
from typing import Any

from segflow import tracking
from segflow.errors import SegflowError

_CASTS = {"STRING": str, "NUMBER_INTEGER": int, "NUMBER_DOUBLE": float, "BOOLEAN": None}


def load_pipeline(path: str | Path):
    """Import a pipeline file and return the one ``@dsl.pipeline`` it defines."""
    from kfp.dsl.graph_component import GraphComponent

    path = Path(path)
    if not path.is_file():
        raise SegflowError(f"pipeline file {path} does not exist.")
    spec = importlib.util.spec_from_file_location(f"segflow_pipeline_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except SegflowError:
        raise
    except Exception as exc:
        raise SegflowError(f"{path} failed to load: {type(exc).__name__}: {exc}") from None
    found = [v for v in vars(module).values() if isinstance(v, GraphComponent)]
    # Imported sub-pipelines are allowed: prefer the one defined in this file.
    own = [p for p in found if getattr(p.pipeline_func, "__module__", "") == module.__name__]
    found = own or found
    if len(found) != 1:
        raise SegflowError(f"{path} defines {len(found)} pipelines; a pipeline file must define exactly one.")
    return found[0]


def pipeline_inputs(pipeline) -> dict[str, tuple[str, Any]]:
    """name -> (type, default) of a pipeline's parameters."""
    spec = pipeline.pipeline_spec.root.input_definitions.parameters
    out = {}
    for name, param in spec.items():
        enum = type(param).DESCRIPTOR.fields_by_name["parameter_type"].enum_type
        kind = enum.values_by_number[param.parameter_type].name
        default = None
        if param.HasField("default_value"):
            from google.protobuf.json_format import MessageToDict

            default = MessageToDict(param.default_value)
        out[name] = (kind, default)
    return out


def parse_params(pipeline, pairs: list[str]) -> dict[str, Any]:
    """``["k=v", ...]`` to typed arguments, checked against the pipeline's parameters."""
    inputs = pipeline_inputs(pipeline)
    params: dict[str, Any] = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        if not sep:
            raise SegflowError(f"--param {pair!r} is not KEY=VALUE.")
        if key not in inputs:
            raise SegflowError(f"--param {key!r} is not a parameter of this pipeline; it takes: {', '.join(inputs)}.")
        kind = inputs[key][0]
        try:
            if kind == "BOOLEAN":
                if raw.lower() not in ("true", "false", "1", "0", "yes", "no"):
                    raise ValueError(raw)
                params[key] = raw.lower() in ("true", "1", "yes")
            else:
                params[key] = _CASTS.get(kind, str)(raw)
        except ValueError:
            raise SegflowError(f"--param {key}={raw!r}: expected a value of type {kind.lower()}.") from None
    return params


def compile_pipeline(path: str | Path, output: str | Path) -> Path:
    from kfp import compiler

    output = Path(output)
    if output.suffix not in (".yaml", ".yml"):
        raise SegflowError(f"--output {output} must end in .yaml: KFP's compiled pipelines are YAML.")
    pipeline = load_pipeline(path)
    try:
        output.parent.mkdir(parents=True, exist_ok=True)
        # Write beside, then rename: a failed compile never leaves half a YAML file.
        partial = output.with_name(f".{output.stem}.partial{output.suffix}")
        compiler.Compiler().compile(pipeline, str(partial))
        partial.replace(output)
    except OSError as exc:
        raise SegflowError(
            f"cannot write {output}: {exc.strerror or exc}. Choose an --output in a writable place."
        ) from None
    return output


def run_local(path: str | Path, params: dict[str, Any] | None = None) -> dict[str, Any]:
    """Run a pipeline on this machine with kfp.local; return its outputs (and where they are)."""
    import kfp.local

    pipeline = load_pipeline(path)
    root = tracking.home() / "kfp"
    root.mkdir(parents=True, exist_ok=True)
    before = {p.name for p in root.iterdir()}
    # Tasks are subprocesses: make them agree with this process on where runs are tracked.
    os.environ["MLFLOW_TRACKING_URI"] = tracking.tracking_uri()
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    kfp.local.init(runner=kfp.local.SubprocessRunner(use_venv=False), pipeline_root=str(root), raise_on_error=True)
    with warnings.catch_warnings():
        # The runner warns that our image name lacks "python"; locally no image is used at all.
        warnings.filterwarnings("ignore", message=".*non-Python base image.*")
        warnings.filterwarnings("ignore", message=".*kfp-kubernetes.*")
        warnings.filterwarnings("ignore", message=".*no effect in the current local runner.*")
        try:
            task = pipeline(**(params or {}))
        except Exception as exc:
            raise SegflowError(f"pipeline {Path(path).name} failed: {exc}") from None
    sys.stdout.flush()
    outputs = dict(getattr(task, "outputs", {}) or {})
    new = sorted((p for p in root.iterdir() if p.name not in before), key=lambda p: p.stat().st_mtime)
    job_dir = new[-1] if new else None
    return {
        "pipeline_root": str(root),
        "outputs": outputs,
        "job_dir": job_dir,
        "artifacts": _artifacts(job_dir),
        "mlflow_run_id": _parent_run_id(job_dir),
    }


def _artifacts(job_dir: Path | None) -> dict[str, list[Path]]:
    """task name -> the artifact paths it wrote (the runner's own files left out)."""
    if job_dir is None:
        return {}
    return {
        task.name: sorted(p for p in task.iterdir() if p.name != "executor_output.json")
        for task in sorted(job_dir.iterdir())
        if task.is_dir()
    }


def _parent_run_id(job_dir: Path | None) -> str:
    """The MLflow parent run of the local job (stages name it after the job)."""
    if job_dir is None:
        return ""
    import mlflow

    mlflow.set_tracking_uri(tracking.tracking_uri())
    found = mlflow.search_runs(
        search_all_experiments=True, filter_string=f"attributes.run_name = '{job_dir.name}'", output_format="list"
    )
    return found[0].info.run_id if found else ""
