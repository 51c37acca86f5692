"""The tracking store: ``MLFLOW_TRACKING_URI`` when set (an MLflow server), otherwise a SQLite file
under ``$SEGFLOW_HOME``; the experiment every run goes to."""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from pathlib import Path

from segflow.errors import SegflowError
from segflow.redact import redact, redact_logging
from segflow.storage import home

DEFAULT_EXPERIMENT = "segflow"

EXPERIMENT_KIND = ("mlflow.experimentKind", "custom_model_development")


def tracking_uri() -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{home() / 'mlflow.db'}"


def experiment_name(name: str | None = None) -> str:
    return name or os.environ.get("SEGFLOW_EXPERIMENT") or DEFAULT_EXPERIMENT


def sqlite_path(uri: str) -> Path | None:
    return Path(uri[len("sqlite:///") :]) if uri.startswith("sqlite:///") else None


@contextlib.contextmanager
def store_lock(uri: str) -> Iterator[None]:
    """Serialise first contact with a SQLite store across processes: a fresh store runs its schema
    migrations on first use, and two processes migrating at once fail (parallel pipeline branches
    start together). A server store needs no lock: the server migrates once, at its own start."""
    path = sqlite_path(uri)
    if path is None:
        yield
        return
    import fcntl

    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.parent / f".{path.name}.lock", "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)  # blocking: the holder only migrates, which takes seconds
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


_READY: set[str] = set()


def connect():
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    # A dead or silent server fails within about a minute instead of retrying for many.
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "30")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "3")
    logging.getLogger("alembic").setLevel(logging.WARNING)
    import mlflow

    redact_logging()  # MLflow's logger has its own handler, set up on import
    uri = tracking_uri()
    if redact(uri) != uri:
        # MLflow prints "View run ... at: URL" with the URL as given, password included.
        os.environ["MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT"] = "true"
    mlflow.set_tracking_uri(uri)
    if uri not in _READY:
        with store_lock(uri):
            try:
                mlflow.MlflowClient().search_experiments(max_results=1)  # creates / migrates a SQLite store
            except Exception as exc:
                raise _unreachable(exc) from None
        _READY.add(uri)
    return mlflow


def _unreachable(exc: Exception) -> SegflowError:
    return SegflowError(
        f"cannot reach the MLflow tracking store {redact(tracking_uri())} ({type(exc).__name__}: {str(exc)[:300]}). "
        "Check MLFLOW_TRACKING_URI, or unset it to track into a local SQLite file."
    )


def client():
    """An MLflow client of the tracking store (a server, or the local SQLite file)."""
    return connect().MlflowClient()


def ensure_experiment(name: str | None = None) -> str:
    """The experiment's id, created when missing (local stores keep artifacts under SEGFLOW_HOME).

    Several stages may create it at the same moment: whoever loses the race reads the winner's.
    """
    mlflow = connect()
    name = experiment_name(name)
    try:
        found = mlflow.get_experiment_by_name(name)
        if found is not None and found.lifecycle_stage == "deleted":
            raise SegflowError(
                f"the MLflow experiment {name!r} (id {found.experiment_id}) was deleted: restore it "
                f"(mlflow experiments restore --experiment-id {found.experiment_id}), or track into another "
                "experiment (SEGFLOW_EXPERIMENT=NAME)."
            )
        if found is not None:
            if EXPERIMENT_KIND[0] not in found.tags:
                mlflow.MlflowClient().set_experiment_tag(found.experiment_id, *EXPERIMENT_KIND)
            return found.experiment_id
        location = None
        if tracking_uri().startswith("sqlite:"):
            location = (home() / "mlartifacts").as_uri()
        try:
            with store_lock(tracking_uri()):
                found = mlflow.get_experiment_by_name(name)
                if found is not None:
                    return found.experiment_id
                return mlflow.create_experiment(name, artifact_location=location, tags=dict([EXPERIMENT_KIND]))
        except mlflow.exceptions.MlflowException as exc:
            found = mlflow.get_experiment_by_name(name)
            if exc.error_code != "RESOURCE_ALREADY_EXISTS" or found is None:
                raise
            return found.experiment_id
    except SegflowError:
        raise
    except Exception as exc:
        raise _unreachable(exc) from None
