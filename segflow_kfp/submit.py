"""Runs and schedules on a Kubeflow Pipelines server, through ``kfp.Client`` (API v2beta1).

    url = submit("pipelines/selfsl_then_finetune.py", Server("https://kfp.example.com/pipeline"), {"epochs": 300})
    schedule("pipelines/retrain.py", server, "0 0 3 * * *", {"data_uri": "s3://landing/street/"})

The pipeline is compiled first (with the cluster's placement, as ``segflow compile`` does), then
sent. Authentication is kfp's: a bearer token (``--existing-token`` / $KF_PIPELINES_TOKEN), or
what kfp.Client finds itself (in-cluster service-account token, kube config). Nothing is stored.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from segflow.errors import SegflowError
from segflow_kfp import orchestration
from segflow_kfp.cluster import ClusterConfig

TOKEN_ENV = "KF_PIPELINES_TOKEN"


@dataclass(frozen=True)
class Server:
    host: str
    token: str = ""  # empty: $KF_PIPELINES_TOKEN, else kfp.Client's own credentials
    namespace: str = ""  # multi-user Kubeflow: the profile namespace

    def client(self):
        import kfp

        if not self.host.startswith(("http://", "https://")):
            raise SegflowError(
                f"--host {self.host!r}: give the KFP API URL, e.g. https://kubeflow.example.com/pipeline."
            )
        try:
            return kfp.Client(
                host=self.host.rstrip("/"),
                existing_token=self.token or os.environ.get(TOKEN_ENV) or None,
                namespace=self.namespace or "kubeflow",
            )
        except Exception as exc:  # kfp raises its own and urllib3's errors here
            raise _unreachable(self.host, exc) from None


def _unreachable(host: str, exc: Exception) -> SegflowError:
    return SegflowError(
        f"cannot reach the Kubeflow Pipelines API at {host} ({type(exc).__name__}: {str(exc)[:300]}). "
        f"Check --host and your credentials (--existing-token or ${TOKEN_ENV})."
    )


def _compiled(pipeline: str | Path, cluster: ClusterConfig | None, folder: str) -> Path:
    return orchestration.compile_pipeline(pipeline, Path(folder) / f"{Path(pipeline).stem}.yaml", cluster)


def run_url(host: str, run_id: str) -> str:
    return f"{host.rstrip('/')}/#/runs/details/{run_id}"


def submit(
    pipeline: str | Path,
    server: Server,
    params: dict[str, Any] | None = None,
    experiment: str = "segflow",
    run_name: str = "",
    cluster: ClusterConfig | None = None,
) -> dict:
    """Compile ``pipeline`` and create a run of it; returns the run's id and URL."""
    client = server.client()
    name = run_name or f"{Path(pipeline).stem}-{_stamp()}"
    with tempfile.TemporaryDirectory(prefix="segflow-submit-") as tmp:
        package = _compiled(pipeline, cluster, tmp)
        try:
            result = client.create_run_from_pipeline_package(
                str(package),
                arguments=params or {},
                run_name=name,
                experiment_name=experiment,
                namespace=server.namespace or None,
            )
        except Exception as exc:
            raise _refused(server.host, "create the run", exc) from None
    return {"run_id": result.run_id, "url": run_url(server.host, result.run_id), "run_name": name}


def _refused(host: str, what: str, exc: Exception) -> SegflowError:
    status = getattr(exc, "status", None)
    detail = getattr(exc, "body", None) or str(exc)
    if status is None:
        return _unreachable(host, exc)
    return SegflowError(f"the KFP server at {host} refused to {what} (HTTP {status}): {str(detail)[:500]}")


def check_cron(cron: str) -> str:
    """KFP's cron has 6 fields (seconds first): "0 0 3 * * *" is every day at 03:00."""
    fields = cron.split()
    if len(fields) != 6:
        raise SegflowError(
            f"--cron {cron!r}: KFP schedules take 6 fields, seconds first (second minute hour day month weekday), "
            'e.g. "0 0 3 * * *" for 03:00 every day.'
        )
    return " ".join(fields)


def schedule(
    pipeline: str | Path,
    server: Server,
    cron: str,
    params: dict[str, Any] | None = None,
    experiment: str = "segflow",
    name: str = "",
    cluster: ClusterConfig | None = None,
) -> dict:
    """A recurring run of ``pipeline``: at most one at a time, and no catch-up of missed ticks
    (a retraining schedule that was paused should train once, not once per missed day)."""
    cron = check_cron(cron)
    client = server.client()
    name = name or f"{Path(pipeline).stem}-{cron.replace(' ', '_').replace('*', 'x')}"
    with tempfile.TemporaryDirectory(prefix="segflow-schedule-") as tmp:
        package = _compiled(pipeline, cluster, tmp)
        try:
            found = client.create_experiment(name=experiment, namespace=server.namespace or None)
            job = client.create_recurring_run(
                experiment_id=found.experiment_id,
                job_name=name,
                cron_expression=cron,
                max_concurrency=1,
                no_catchup=True,
                params=params or {},
                pipeline_package_path=str(package),
                enabled=True,
            )
        except Exception as exc:
            raise _refused(server.host, "create the recurring run", exc) from None
    return {"id": job.recurring_run_id, "name": name, "cron": cron}


def list_schedules(server: Server) -> list[dict]:
    client = server.client()
    try:
        answer = client.list_recurring_runs(page_size=200, namespace=server.namespace or None)
    except Exception as exc:
        raise _refused(server.host, "list recurring runs", exc) from None
    out = []
    for job in answer.recurring_runs or []:
        cron = job.trigger.cron_schedule.cron if job.trigger and job.trigger.cron_schedule else ""
        out.append({"id": job.recurring_run_id, "name": job.display_name, "cron": cron, "status": job.status})
    return out


def delete_schedule(server: Server, recurring_run_id: str) -> None:
    client = server.client()
    try:
        client.delete_recurring_run(recurring_run_id)
    except Exception as exc:
        raise _refused(server.host, f"delete recurring run {recurring_run_id}", exc) from None


def _stamp() -> str:
    import time

    return time.strftime("%Y%m%d-%H%M%S")
