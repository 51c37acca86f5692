"""The installed ``segflow`` command: the library's stage commands (``segflow.cli``) plus the
pipeline commands, which need kfp: run (kfp.local), compile, submit, schedule, params."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated

import typer

from segflow import cli
from segflow.errors import SegflowError
from segflow.redact import redact

pipelines_app = typer.Typer()


@pipelines_app.command("run")
def run(
    pipeline: Annotated[Path, typer.Argument(help="A file in pipelines/.")],
    local: Annotated[bool, typer.Option("--local", help="Run on this machine with kfp.local.")] = False,
    param: Annotated[list[str] | None, typer.Option("--param", "-p", help="KEY=VALUE, repeatable.")] = None,
) -> None:
    """Run a pipeline. With --local: kfp.local's subprocess runner, MLflow tracking under $SEGFLOW_HOME."""
    from segflow import tracking
    from segflow_kfp import orchestration

    if not local:
        raise SegflowError(
            "only --local runs are started by `segflow run`. For a cluster: `segflow compile PIPELINE "
            "--output p.yaml`, then `kfp run create -e EXPERIMENT -r NAME -f p.yaml`."
        )
    params = orchestration.parse_params(orchestration.load_pipeline(pipeline), param or [])
    typer.echo(f"running {pipeline.name} locally (one line per task as it finishes)")
    result = orchestration.run_local(pipeline, params, show=sys.stdout)
    seconds = sum(t["seconds"] for t in result["tasks"].values())
    typer.echo(f"pipeline {pipeline.name} finished: {len(result['tasks'])} tasks, {seconds:.0f} s of task time")
    typer.echo(f"  outputs:  {result['job_dir'] or result['pipeline_root']}  (one folder per task)")
    for name, value in result["outputs"].items():
        typer.echo(f"  output {name}: {getattr(value, 'uri', value)}")
    typer.echo(f"  full log: {result['log']}")
    store = redact(tracking.tracking_uri())
    typer.echo(f"  MLflow:   parent run {result['mlflow_run_id'] or '(none)'} in {store}")
    typer.echo(f"  browse:   mlflow ui --backend-store-uri {store}")


# Where compiled tasks run (segflow_kfp.cluster.ClusterConfig): shared by compile, submit and schedule.
ClusterFile = Annotated[
    Path | None, typer.Option("--cluster-config", help="YAML file of the settings below (flags win).")
]
GpuSelector = Annotated[
    list[str] | None, typer.Option("--gpu-node-selector", help="KEY=VALUE node label of the GPU pool (repeatable).")
]
GpuToleration = Annotated[
    list[str] | None, typer.Option("--gpu-toleration", help="KEY[=VALUE]:EFFECT taint the GPU stages tolerate.")
]
Gpus = Annotated[int | None, typer.Option("--gpus", help="GPUs per GPU pod (>1: torchrun in the pod).")]
Image = Annotated[str, typer.Option("--image", help="Image of the CPU stages.")]
GpuImage = Annotated[str, typer.Option("--gpu-image", help="Image of the GPU stages (pretrain, train, adapt).")]
CpuRequest = Annotated[str, typer.Option(help="CPU request of CPU stages, e.g. 2 or 500m.")]
MemoryRequest = Annotated[str, typer.Option(help="Memory request of CPU stages, e.g. 8G.")]
GpuCpuRequest = Annotated[str, typer.Option(help="CPU request of GPU stages.")]
GpuMemoryRequest = Annotated[str, typer.Option(help="Memory request of GPU stages.")]
Retries = Annotated[int | None, typer.Option("--retries", help="Retries of every task (exponential backoff).")]


def cluster_settings(
    cluster_config, gpu_node_selector, gpu_toleration, gpus, image, gpu_image, cpu_request, memory_request,
    gpu_cpu_request, gpu_memory_request, retries,
):  # fmt: skip
    from segflow_kfp import cluster

    return cluster.load(
        cluster_config,
        gpu_node_selector=gpu_node_selector,
        gpu_tolerations=gpu_toleration,
        gpus=gpus,
        image=image,
        gpu_image=gpu_image,
        cpu_request=cpu_request,
        memory_request=memory_request,
        gpu_cpu_request=gpu_cpu_request,
        gpu_memory_request=gpu_memory_request,
        retries=retries,
    )


@pipelines_app.command("compile")
def compile_(
    pipeline: Annotated[Path, typer.Argument(help="A file in pipelines/.")],
    output: Annotated[Path, typer.Option("--output", "-o", help="YAML file to write.")],
    cluster_config: ClusterFile = None,
    gpu_node_selector: GpuSelector = None,
    gpu_toleration: GpuToleration = None,
    gpus: Gpus = None,
    image: Image = "",
    gpu_image: GpuImage = "",
    cpu_request: CpuRequest = "",
    memory_request: MemoryRequest = "",
    gpu_cpu_request: GpuCpuRequest = "",
    gpu_memory_request: GpuMemoryRequest = "",
    retries: Retries = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace --output if it exists.")] = False,
) -> None:
    """Compile a pipeline to KFP IR YAML (what `kfp run create -f` takes), placed for a cluster."""
    from segflow_kfp import orchestration

    placement = cluster_settings(
        cluster_config, gpu_node_selector, gpu_toleration, gpus, image, gpu_image, cpu_request, memory_request,
        gpu_cpu_request, gpu_memory_request, retries,
    )  # fmt: skip
    typer.echo(f"wrote {orchestration.compile_pipeline(pipeline, output, placement, overwrite)}")


Host = Annotated[str, typer.Option("--host", help="KFP API URL, e.g. https://kubeflow.example.com/pipeline.")]
Token = Annotated[
    str,
    typer.Option("--existing-token", envvar="KF_PIPELINES_TOKEN", help="Bearer token (else kfp's own credentials)."),
]
Namespace = Annotated[str, typer.Option("--namespace", help="Kubeflow profile namespace (multi-user).")]
Params = Annotated[list[str] | None, typer.Option("--param", "-p", help="KEY=VALUE, repeatable.")]
Experiment = Annotated[str, typer.Option("--experiment", help="KFP experiment.")]


@pipelines_app.command("submit")
def submit_cmd(
    pipeline: Annotated[Path, typer.Argument(help="A file in pipelines/.")],
    host: Host,
    experiment: Experiment = "segflow",
    run_name: Annotated[str, typer.Option("--run-name", help="Default: PIPELINE-DATE-TIME.")] = "",
    param: Params = None,
    existing_token: Token = "",
    namespace: Namespace = "",
    cluster_config: ClusterFile = None,
    gpu_node_selector: GpuSelector = None,
    gpu_toleration: GpuToleration = None,
    gpus: Gpus = None,
    image: Image = "",
    gpu_image: GpuImage = "",
    cpu_request: CpuRequest = "",
    memory_request: MemoryRequest = "",
    gpu_cpu_request: GpuCpuRequest = "",
    gpu_memory_request: GpuMemoryRequest = "",
    retries: Retries = None,
) -> None:
    """Compile a pipeline (placed for the cluster, as `compile` does) and start a run of it on a
    Kubeflow Pipelines server; prints the run's URL."""
    from segflow_kfp import orchestration, submit

    placement = cluster_settings(
        cluster_config, gpu_node_selector, gpu_toleration, gpus, image, gpu_image, cpu_request, memory_request,
        gpu_cpu_request, gpu_memory_request, retries,
    )  # fmt: skip
    arguments = orchestration.parse_params(orchestration.load_pipeline(pipeline), param or [])
    server = submit.Server(host, existing_token, namespace)
    run = submit.submit(pipeline, server, arguments, experiment, run_name, placement)
    typer.echo(f"run {run['run_name']} ({run['run_id']}) created in experiment {experiment}")
    typer.echo(redact(run["url"]))


@pipelines_app.command("schedule")
def schedule_cmd(
    pipeline: Annotated[Path | None, typer.Argument(help="A file in pipelines/ (not with --list / --delete).")] = None,
    host: Host = "",
    cron: Annotated[str, typer.Option("--cron", help='6 fields, seconds first: "0 0 3 * * *" = 03:00 daily.')] = "",
    name: Annotated[str, typer.Option("--name", help="Recurring run name.")] = "",
    experiment: Experiment = "segflow",
    param: Params = None,
    list_: Annotated[bool, typer.Option("--list", help="List recurring runs.")] = False,
    delete: Annotated[str, typer.Option("--delete", help="Delete the recurring run with this ID.")] = "",
    existing_token: Token = "",
    namespace: Namespace = "",
    cluster_config: ClusterFile = None,
    gpu_node_selector: GpuSelector = None,
    gpu_toleration: GpuToleration = None,
    gpus: Gpus = None,
    image: Image = "",
    gpu_image: GpuImage = "",
    retries: Retries = None,
) -> None:
    """A recurring run on a Kubeflow Pipelines server (max concurrency 1, no catch-up), or
    --list / --delete ID of the existing ones."""
    from segflow_kfp import orchestration, submit

    if not host:
        raise SegflowError("--host is required: the KFP API URL, e.g. https://kubeflow.example.com/pipeline.")
    server = submit.Server(host, existing_token, namespace)
    if list_:
        for job in submit.list_schedules(server):
            typer.echo(f"{job['id']}  {job['name']}  {job['cron']}  {job['status']}")
        return
    if delete:
        submit.delete_schedule(server, delete)
        typer.echo(f"deleted recurring run {delete}")
        return
    if pipeline is None or not cron:
        raise SegflowError("schedule PIPELINE --cron '0 0 3 * * *' --host URL; or --list, or --delete ID.")
    submit.check_cron(cron)
    placement = cluster_settings(
        cluster_config, gpu_node_selector, gpu_toleration, gpus, image, gpu_image, "", "", "", "", retries
    )
    arguments = orchestration.parse_params(orchestration.load_pipeline(pipeline), param or [])
    job = submit.schedule(pipeline, server, cron, arguments, experiment, name, placement)
    typer.echo(f"recurring run {job['name']} ({job['id']}): {job['cron']}, one at a time, no catch-up")


@pipelines_app.command("params")
def params(pipeline: Annotated[Path, typer.Argument(help="A file in pipelines/.")]) -> None:
    """List a pipeline's parameters and their defaults."""
    from segflow_kfp import orchestration

    inputs = orchestration.pipeline_inputs(orchestration.load_pipeline(pipeline))
    for name, (kind, default) in sorted(inputs.items()):
        if kind == "NUMBER_INTEGER" and default is not None:
            default = int(default)  # protobuf keeps every number as a double
        typer.echo(f"{name} ({kind.lower()}) = {json.dumps(default)}")


def command() -> typer.Typer:
    """The library's commands and groups, then the pipeline commands, in one app."""
    app = typer.Typer(
        no_args_is_help=True,
        add_completion=False,
        pretty_exceptions_enable=False,
        help=cli.app.info.help,
    )
    app.registered_commands = [*cli.app.registered_commands, *pipelines_app.registered_commands]
    app.registered_groups = list(cli.app.registered_groups)
    return app


app = command()


def main(argv: list[str] | None = None) -> None:
    """The ``segflow`` command (``argv``: for calling it in-process, as the tests do)."""
    cli.run_app(app, argv)


if __name__ == "__main__":
    main()
