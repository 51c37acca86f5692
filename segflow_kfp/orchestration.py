"""Load, compile and run the pipelines in ``pipelines/``.

``run_local`` uses kfp.local's SubprocessRunner (no containers, no venv per task): every task
runs as a subprocess of this Python, so the installed segflow is the code that runs.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import logging
import os
import re
import threading
import time
import warnings
from pathlib import Path
from typing import Any

from segflow import tracking
from segflow.errors import SegflowError
from segflow.redact import RedactingFilter
from segflow_kfp.cluster import LOCAL, ClusterConfig

_CASTS = {"STRING": str, "NUMBER_INTEGER": int, "NUMBER_DOUBLE": float, "BOOLEAN": None, "LIST": json.loads}


def load_pipeline(path: str | Path, cluster: ClusterConfig | None = None):
    """Import a pipeline file and return the one ``@dsl.pipeline`` it defines, its tasks placed
    with ``cluster`` (images, GPU pools, retries; default: ``ClusterConfig()``'s)."""
    from segflow_kfp.platform import placement

    with placement(cluster or ClusterConfig()):
        return _load(path)


def _load(path: str | Path):
    from kfp.dsl.graph_component import GraphComponent

    path = Path(path)
    if not path.is_file():
        raise SegflowError(f"pipeline file {path} does not exist.")
    spec = importlib.util.spec_from_file_location(f"segflow_pipeline_{path.stem}", path)
    if path.suffix != ".py" or spec is None:
        raise SegflowError(f"{path} is not a pipeline file: give a Python file from pipelines/ (e.g. supervised.py).")
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
        except ValueError:  # json.JSONDecodeError is one too
            raise SegflowError(f"--param {key}={raw!r}: expected a value of type {kind.lower()}.") from None
        if kind == "LIST" and not isinstance(params[key], list):
            raise SegflowError(f'--param {key}={raw!r}: expected a JSON list, e.g. ["a", "b"].')
    return params


def compile_pipeline(
    path: str | Path, output: str | Path, cluster: ClusterConfig | None = None, overwrite: bool = False
) -> Path:
    """Compile to ``output`` (refused when it exists, unless ``overwrite``); a failed compile
    never leaves half a YAML file, and two compiles never share a temporary file."""
    from kfp import compiler

    from segflow import storage

    output = Path(output)
    if output.suffix not in (".yaml", ".yml"):
        raise SegflowError(f"--output {output} must end in .yaml: KFP's compiled pipelines are YAML.")
    pipeline = load_pipeline(path, cluster)
    if Path(path).expanduser().resolve() == output.expanduser().resolve():
        raise SegflowError(f"--output {output} is the pipeline file itself: choose another name.")
    return storage.write_file(
        output, lambda partial: compiler.Compiler().compile(pipeline, str(partial)), overwrite, "--output"
    )


def run_local(path: str | Path, params: dict[str, Any] | None = None, show=None) -> dict[str, Any]:
    """Run a pipeline on this machine with kfp.local; return its outputs (and where they are).

    Everything the runner and the tasks print goes to a log file under $SEGFLOW_HOME/logs; ``show``
    (a text stream, e.g. the terminal) gets one line per task as it finishes: name, state, seconds
    and its headline metric, plus a live status line on a terminal.
    """
    import kfp.local

    pipeline = load_pipeline(path, LOCAL)  # no retries: a failed local task fails the run at once
    root = tracking.home() / "kfp"
    root.mkdir(parents=True, exist_ok=True)
    logs = tracking.home() / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    log_path = logs / f"{Path(path).stem}-{time.strftime('%Y%m%d-%H%M%S')}.log"
    before = {p.name for p in root.iterdir()}
    # Tasks are subprocesses: make them agree with this process on where runs are tracked.
    os.environ["MLFLOW_TRACKING_URI"] = tracking.tracking_uri()
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    threads = _one_thread_per_task() if has_parallel_branches(pipeline) else contextlib.nullcontext()
    kfp.local.init(runner=kfp.local.SubprocessRunner(use_venv=False), pipeline_root=str(root), raise_on_error=True)
    failure = ""
    with (
        threads,
        _runner_logs_to(log_path),
        open(log_path, "a", buffering=1) as log_file,  # O_APPEND: shared with the log handler
        TaskWatcher(log_path, root, before, show) as watcher,
        contextlib.redirect_stdout(log_file),
        contextlib.redirect_stderr(log_file),
        warnings.catch_warnings(),
    ):
        # The runner warns that our image name lacks "python"; locally no image is used at all.
        warnings.filterwarnings("ignore", message=".*non-Python base image.*")
        warnings.filterwarnings("ignore", message=".*kfp-kubernetes.*")
        warnings.filterwarnings("ignore", message=".*no effect in the current local runner.*")
        try:
            task = pipeline(**(params or {}))
        except Exception as exc:
            failure = str(exc)
    if failure:
        raise SegflowError(
            f"pipeline {Path(path).name} failed: {_first_line(failure)}",
            problems=[*watcher.last_errors(), f"the whole log: {log_path}"],
        )
    outputs = dict(getattr(task, "outputs", {}) or {})
    new = sorted((p for p in root.iterdir() if p.name not in before), key=lambda p: p.stat().st_mtime)
    job_dir = new[-1] if new else None
    return {
        "pipeline_root": str(root),
        "outputs": outputs,
        "job_dir": job_dir,
        "log": log_path,
        "tasks": watcher.finished,
        "artifacts": _artifacts(job_dir),
        "mlflow_run_id": _parent_run_id(job_dir),
    }


def has_parallel_branches(pipeline) -> bool:
    """Whether any DAG of the compiled pipeline holds a ParallelFor (a task with an iterator)."""
    spec = pipeline.pipeline_spec
    dags = [spec.root.dag, *(c.dag for c in spec.components.values() if c.HasField("dag"))]
    return any(task.WhichOneof("iterator") for dag in dags for task in dag.tasks.values())


@contextlib.contextmanager
def _one_thread_per_task():
    """kfp.local runs a ParallelFor's branches side by side as subprocesses: with torch's default
    threads each, they fight over the cores (the domain adaptation demo took over 10 minutes on 2
    cores, 3 with one thread per task). A user's own OMP_NUM_THREADS is kept."""
    if "OMP_NUM_THREADS" in os.environ:
        yield
        return
    os.environ["OMP_NUM_THREADS"] = "1"
    try:
        yield
    finally:
        os.environ.pop("OMP_NUM_THREADS", None)


@contextlib.contextmanager
def _runner_logs_to(log_path: Path):
    """kfp.local logs through the root logger, also after its own log context ends ("Cleaned up
    workspace"): while a pipeline runs, those records go to the run's log file, not the terminal.

    Afterwards the root logger gets back exactly the handlers it had. kfp.local swaps them per
    task, and tasks of a ParallelFor do so from several threads at once, so one of them can
    "restore" another's handler: a StreamHandler on the redirected output, closed after the run."""
    root = logging.getLogger()
    handler = logging.FileHandler(log_path)  # append mode, like the redirected output beside it
    before = root.handlers[:]
    quiet = [(h, h.level) for h in before]
    for h, _ in quiet:
        h.setLevel(logging.WARNING)
    handler.addFilter(RedactingFilter())
    root.addHandler(handler)
    try:
        yield
    finally:
        for h in root.handlers[:]:
            if h not in before:
                root.removeHandler(h)
        for h in before:
            if h not in root.handlers:
                root.addHandler(h)
        handler.close()
        for h, level in quiet:
            h.setLevel(level)


_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_STARTED = re.compile(r"Executing task '([^']+)'")
_FINISHED = re.compile(r"Task '([^']+)' finished with status (\w+)")
_PROGRESS = re.compile(r"INFO segflow\.[\w.]+: (.*)")
# The figure to show for a task: the first of these its metrics hold.
HEADLINE = ("mDice", "best_val_mDice", "final_loss", "ir_mDice", "images_train", "images", "latency_ms")


def _first_line(text: str) -> str:
    return _ANSI.sub("", text).strip().splitlines()[0] if text.strip() else ""


class TaskWatcher:
    """Follows the run's log file from a thread: notes when each task starts and ends, and prints
    one line per finished task (with its headline metric) to ``show``."""

    def __init__(self, log_path: Path, root: Path, before: set[str], show=None) -> None:
        self.log_path, self.root, self.before, self.show = log_path, root, before, show
        self.live = bool(show is not None and getattr(show, "isatty", lambda: False)())
        self.started: dict[str, float] = {}
        self.finished: dict[str, dict] = {}
        self.recent: list[str] = []  # the last lines of output, for a failure's message
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._follow, daemon=True)

    def __enter__(self) -> TaskWatcher:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def _follow(self) -> None:
        with open(self.log_path) as log:
            while True:
                line = log.readline()
                if line:
                    self._read(_ANSI.sub("", line).rstrip())
                    continue
                if self._stop.is_set():
                    break
                self._status()
                time.sleep(0.2)
        if self.live:
            self.show.write("\r\033[K")

    def _read(self, line: str) -> None:
        if line.strip():
            self.recent = [*self.recent[-40:], line.strip()]
        if match := _STARTED.search(line):
            self.started[match[1]] = time.monotonic()
        elif match := _FINISHED.search(line):
            name, state = match[1], match[2]
            seconds = time.monotonic() - self.started.get(name, time.monotonic())
            metrics = self._metrics(name)
            self.finished[name] = {"state": state, "seconds": seconds, "metrics": metrics}
            if self.show is not None:
                headline = next((f"{k} {metrics[k]:.4g}" for k in HEADLINE if k in metrics), "")
                mark = "ok " if state == "SUCCESS" else "FAILED"
                clear = "\r\033[K" if self.live else ""
                self.show.write(f"{clear}  {mark:6s} {name:28s} {seconds:7.1f} s  {headline}\n")
                self.show.flush()

    def _status(self) -> None:
        running = [n for n in self.started if n not in self.finished]
        if not self.live or not running:
            return
        name = running[-1]
        seconds = time.monotonic() - self.started[name]
        # The running task's latest progress line (segflow logs "epoch 3/12 loss ...", "checking items: 8/48").
        progress = next((m[1] for r in reversed(self.recent) if (m := _PROGRESS.search(r))), "")
        self.show.write(f"\r\033[K  ...    {name:28s} {seconds:7.1f} s  {progress[:70]}")
        self.show.flush()

    def _metrics(self, task: str) -> dict[str, float]:
        """The task's Metrics artifact values (from its executor output)."""
        # This run's folder: new since the start and holding the task (the pipeline root also gets a
        # new checkpoints/ folder, written to later than the run's own).
        outputs = [p / task / "executor_output.json" for p in self.root.iterdir() if p.name not in self.before]
        outputs = sorted((o for o in outputs if o.exists()), key=lambda o: o.stat().st_mtime)
        found: dict[str, float] = {}
        if outputs:
            for artifacts in json.loads(outputs[-1].read_text()).get("artifacts", {}).values():
                for artifact in artifacts.get("artifacts", []):
                    found |= {k: v for k, v in artifact.get("metadata", {}).items() if isinstance(v, int | float)}
        return found

    def last_errors(self) -> list[str]:
        errors = [r for r in self.recent if "error" in r.lower() or "Traceback" in r or "failed" in r.lower()]
        return errors[-6:] or self.recent[-6:]


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
