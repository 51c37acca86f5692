"""The parent run of a pipeline run: made by whichever stage asks first (racing stages settle on
one), closed by the pipeline's exit handler with its parameters and the code's version."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

from segflow.tracking.store import connect, ensure_experiment, sqlite_path, store_lock, tracking_uri

PIPELINE_RUN_TAG = "segflow.pipeline_run"

_SETTLE_SECONDS = 2.0


@dataclass(frozen=True)
class RunContext:
    """Which pipeline run a stage belongs to (KFP fills these from its job id and name)."""

    run_key: str = ""
    run_name: str = ""
    experiment: str = ""


def pipeline_parent(run_key: str, run_name: str = "", experiment: str | None = None) -> str:
    """The parent run of pipeline run ``run_key`` (the KFP job id), created by whichever stage asks first.

    Stages of one pipeline run may start at the same moment. On a SQLite store, find-or-create
    runs under the store's file lock, so exactly one parent is made. On a server, a creator waits
    a moment and looks again, so that racing creators see each other; all settle on the oldest
    (ties: smallest id) and the others delete theirs.
    """
    mlflow = connect()
    client = mlflow.MlflowClient()
    experiment_id = ensure_experiment(experiment)
    query = f"tags.`{PIPELINE_RUN_TAG}` = '{run_key}'"

    def oldest():
        runs = client.search_runs([experiment_id], query, max_results=50)
        return min(runs, key=lambda r: (r.info.start_time, r.info.run_id)) if runs else None

    with store_lock(tracking_uri()):
        found = oldest()
        if found is not None:
            return found.info.run_id
        mine = client.create_run(experiment_id, run_name=run_name or run_key, tags={PIPELINE_RUN_TAG: run_key})
    if sqlite_path(tracking_uri()) is None:
        time.sleep(_SETTLE_SECONDS)  # let a creator that raced us commit, so both pick the same winner
        winner = oldest()
        if winner is not None and winner.info.run_id != mine.info.run_id:
            client.delete_run(mine.info.run_id)
            return winner.info.run_id
    return mine.info.run_id


def end_pipeline_run(
    run_key: str,
    succeeded: bool,
    experiment: str | None = None,
    run_name: str = "",
    pipeline: str = "",
    params: dict | None = None,
) -> None:
    """Close the parent run of ``run_key`` FINISHED or FAILED (the pipeline's exit handler calls
    this), with the pipeline's parameters and tags for its name, code version and image, so that
    runs compare in the UI's runs table and compare view."""
    mlflow = connect()
    client = mlflow.MlflowClient()
    parent = pipeline_parent(run_key, run_name, experiment)
    if params:
        logged = client.get_run(parent).data.params
        fresh = {k: param_text(v) for k, v in params.items() if k not in logged}
        if fresh:
            client.log_batch(parent, params=[mlflow.entities.Param(k, v) for k, v in sorted(fresh.items())])
    for key, value in {**code_tags(), "segflow.pipeline": pipeline}.items():
        if value:
            client.set_tag(parent, key, value)
    client.set_terminated(parent, "FINISHED" if succeeded else "FAILED")


def param_text(value) -> str:
    """A pipeline parameter as text; KFP hands an int parameter over as float text ("3.0")."""
    text = str(value)
    if text.endswith(".0") and text[:-2].lstrip("-").isdigit():
        return text[:-2]
    return text[:6000]


def code_tags() -> dict[str, str]:
    """Which code made a run: the package version, the git commit (a checkout, or SEGFLOW_GIT_COMMIT
    baked into an image) and the image (SEGFLOW_IMAGE, which compiled tasks set)."""
    import importlib.metadata
    import subprocess

    commit = os.environ.get("SEGFLOW_GIT_COMMIT", "")
    if not commit:
        try:
            here = Path(__file__).resolve().parent
            done = subprocess.run(
                ["git", "-C", str(here), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5
            )
            commit = done.stdout.strip() if done.returncode == 0 else ""
        except (OSError, subprocess.SubprocessError):
            commit = ""
    return {
        "segflow.version": importlib.metadata.version("segflow"),
        "segflow.git_commit": commit,
        "segflow.image": os.environ.get("SEGFLOW_IMAGE", ""),
    }
