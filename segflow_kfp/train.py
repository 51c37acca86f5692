"""Train a Lite-HRNet segmentation model on a dataset artifact."""

from kfp import dsl
from kfp.dsl import Dataset, Input, Metrics, Model, Output

from segflow_kfp import SEGFLOW_GPU_IMAGE


@dsl.component(base_image=SEGFLOW_GPU_IMAGE, install_kfp_package=False)
def train_model(
    dataset: Input[Dataset],
    model: Output[Model],
    metrics: Output[Metrics],
    model_name: str = "lite_hrnet_s",
    method: str = "supervised",
    unlabeled_uri: str = "",
    epochs: int = 30,
    batch_size: int = 8,
    input_size: int = 256,
    iters_per_epoch: int = 0,
    tile: int = 0,
    tile_overlap: float = 0.25,
    tile_scale: float = 1.0,
    seed: int = 0,
    init_backbone: Input[Model] = None,
    init_model: Input[Model] = None,
    init_model_uri: str = "",
    processes: int = 0,
    checkpoint_root: str = "",
    task_name: str = "",
    run_key: str = "",
    run_name: str = "",
    experiment: str = "",
):
    """METHOD: supervised, supcon, or mean_teacher (needs UNLABELED_URI, a folder of images).
    INIT_BACKBONE (optional): DetCon-pretrained backbone weights to start from.
    PROCESSES: 0 = one per GPU of the pod (several: torchrun, DDP). CHECKPOINT_ROOT (the pipeline
    root): checkpoints live under it, so a retry in a fresh pod resumes. TILE: large images, tiles
    of this side at native resolution (0: whole images, -1: auto); the model carries its tiling."""
    options = dict(locals())  # the component's inputs, before any other name
    from segflow.configs import from_options
    from segflow.launch import run_task
    from segflow.stages import log_metrics_to
    from segflow.tracking import RunContext
    from segflow.train.config import TrainConfig, method_settings

    cfg = from_options(
        TrainConfig,
        options,
        (
            "dataset",
            "metrics",
            "model_name",
            "method",
            "unlabeled_uri",
            "init_model_uri",
            "processes",
            "checkpoint_root",
            "task_name",
            "run_key",
            "run_name",
            "experiment",
        ),
        data=dataset.path,
        out=model.path,
        model=model_name,
        init_backbone=init_backbone.path if init_backbone is not None else "",
        init_model=init_model.path if init_model is not None else init_model_uri,
        **method_settings(method, unlabeled_uri),
    )
    run = RunContext(run_key, run_name, experiment)
    result = run_task("train", cfg, run, processes, checkpoint_root, task_name)
    model.metadata.update(
        {
            "architecture": model_name,
            "method": method,
            "best_val_mDice": result.best_val_mDice,
            "best_epoch": result.best_epoch,
            "dataset_fingerprint": result.dataset_fingerprint,
            **({"tiling": result.tiling} if result.tiling else {}),
        }
    )
    log_metrics_to(metrics, result.metrics)
