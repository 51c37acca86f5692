"""Kubernetes settings of every task: credentials from secrets, resources, retries, caching, and
for GPU stages the GPU request, node selector and tolerations.

Placement comes from a :class:`segflow_kfp.cluster.ClusterConfig` that ``segflow compile`` (or
``submit``) makes current while the pipeline file is built (:func:`placement`). kfp-kubernetes
settings are ignored by the local runner, so pipelines apply them unconditionally.
"""

import contextlib
from collections.abc import Iterator

from kfp import dsl, kubernetes
from kfp.dsl import PipelineTask

from segflow_kfp.cluster import LOCAL, ClusterConfig

# Created by charts/segflow (values.yaml: mlflow.*, s3.*).
MLFLOW_SECRET = "segflow-mlflow"
S3_SECRET = "segflow-s3"

_current = ClusterConfig()


@contextlib.contextmanager
def placement(config: ClusterConfig) -> Iterator[ClusterConfig]:
    """Build pipelines with ``config`` (what `segflow compile` does around loading the file)."""
    global _current
    before, _current = _current, config
    try:
        yield config
    finally:
        _current = before


def resumable() -> dict:
    """Arguments of a training task that keep its checkpoints under the pipeline root (S3 on a
    cluster), keyed by run and task: a retry in a fresh pod, on another node, resumes from them."""
    return {"checkpoint_root": dsl.PIPELINE_ROOT_PLACEHOLDER, "task_name": dsl.PIPELINE_TASK_NAME_PLACEHOLDER}


def on_cluster(
    task: PipelineTask, gpu: bool = False, cpu: str = "2", memory: str = "8G", cache: bool = False
) -> PipelineTask:
    """Secrets, resources, retries and caching for any task; GPU settings only when ``gpu``.

    KFP's cache keys on a task's input values and artifact URIs, not on the content behind them.
    Caching stays off (``cache=False``) for tasks that read URIs of data that may change in place
    (imports, folders of images), and for every tracked task: each receives its pipeline run's ID
    (its MLflow parent), so no two runs ever share a cache key.
    """
    config = _current
    task.set_caching_options(cache)
    kubernetes.use_secret_as_env(task, MLFLOW_SECRET, {"MLFLOW_TRACKING_URI": "MLFLOW_TRACKING_URI"})
    kubernetes.use_secret_as_env(
        task,
        S3_SECRET,
        {
            "AWS_ACCESS_KEY_ID": "AWS_ACCESS_KEY_ID",
            "AWS_SECRET_ACCESS_KEY": "AWS_SECRET_ACCESS_KEY",
            "AWS_ENDPOINT_URL": "AWS_ENDPOINT_URL",
            "AWS_DEFAULT_REGION": "AWS_DEFAULT_REGION",
        },
    )
    if config.retries:
        # A lost (preempted) node fails the pod; the retry starts a fresh one, and training stages
        # resume from their checkpoints under the pipeline root.
        task.set_retry(
            num_retries=config.retries,
            backoff_duration=f"{config.backoff_seconds}s",
            backoff_factor=2.0,
            backoff_max_duration=f"{config.backoff_max_seconds}s",
        )
    image = config.gpu_image if gpu else config.image
    if image and task.container_spec is not None:
        task.container_spec.image = image
    if config != LOCAL and task.container_spec is not None:
        # The image a stage ran in becomes a tag of its MLflow runs (segflow.tracking.code_tags).
        task.set_env_variable("SEGFLOW_IMAGE", task.container_spec.image)
    if gpu:
        task.set_cpu_request(config.gpu_cpu_request).set_memory_request(config.gpu_memory_request)
        task.set_accelerator_type(config.accelerator).set_accelerator_limit(config.gpus)
        for key, value in config.gpu_node_selector.items():
            kubernetes.add_node_selector(task, key, value)
        for toleration in config.gpu_tolerations:
            kubernetes.add_toleration(
                task,
                key=toleration.key,
                operator=toleration.operator,
                value=toleration.value or None,
                effect=toleration.effect,
            )
    else:
        task.set_cpu_request(config.cpu_request or cpu).set_memory_request(config.memory_request or memory)
    return task
