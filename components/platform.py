"""Kubernetes settings shared by every task: where MLflow and S3 credentials come from, node pools.

kfp-kubernetes settings are ignored by the local runner, so pipelines apply them unconditionally.
"""

from kfp import kubernetes
from kfp.dsl import PipelineTask

# Created by charts/segflow (values.yaml: mlflow.*, s3.*).
MLFLOW_SECRET = "segflow-mlflow"
S3_SECRET = "segflow-s3"


def on_cluster(
    task: PipelineTask, gpu: bool = False, cpu: str = "2", memory: str = "8G", cache: bool = True
) -> PipelineTask:
    """Credentials from secrets, resources, and for GPU stages the GPU node pool.

    ``cache=False`` for tasks whose inputs are URIs of data that may change in place (imports) or
    that must run every time (tracking): KFP's cache keys on the URI string, not the content.
    """
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
    task.set_cpu_request(cpu).set_memory_request(memory)
    if gpu:
        task.set_accelerator_type("nvidia.com/gpu").set_accelerator_limit(1)
        kubernetes.add_node_selector(task, "segflow.io/pool", "gpu")
        kubernetes.add_toleration(task, key="nvidia.com/gpu", operator="Exists", effect="NoSchedule")
    return task
