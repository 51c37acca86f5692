"""Self-supervised stages on a folder of unlabelled images: DetCon pseudo masks, DetCon pretraining."""

from kfp import dsl
from kfp.dsl import Dataset, Input, Metrics, Model, Output

from segflow_kfp import SEGFLOW_GPU_IMAGE, SEGFLOW_IMAGE


@dsl.component(base_image=SEGFLOW_IMAGE, install_kfp_package=False)
def pseudo_masks(
    images_uri: str,
    masks: Output[Dataset],
    metrics: Output[Metrics],
    scale: float = 0.0,
    sigma: float = 0.8,
    min_size: int = 0,
    run_key: str = "",
    run_name: str = "",
    experiment: str = "",
):
    """Felzenszwalb masks of every image under IMAGES_URI (local path or s3://; no labels needed).
    SCALE and MIN_SIZE 0: chosen from the image size (segflow.selfsl.pseudo_masks)."""
    from segflow.selfsl.pseudo_masks import FelzenszwalbParams
    from segflow.stages import log_metrics_to, pseudo_masks_stage
    from segflow.tracking import RunContext

    params = FelzenszwalbParams(scale=scale, sigma=sigma, min_size=min_size)
    result = pseudo_masks_stage(images_uri, masks.path, params, run=RunContext(run_key, run_name, experiment))
    masks.metadata.update({"images": result.images, "source": images_uri, **result.params})
    log_metrics_to(metrics, result.metrics)


@dsl.component(base_image=SEGFLOW_GPU_IMAGE, install_kfp_package=False)
def pretrain_backbone(
    images_uri: str,
    masks: Input[Dataset],
    backbone: Output[Model],
    metrics: Output[Metrics],
    model_name: str = "lite_hrnet_s",
    epochs: int = 10,
    batch_size: int = 16,
    input_size: int = 0,
    lr: float = 0.0,
    iters_per_epoch: int = 0,
    seed: int = 0,
    processes: int = 0,
    checkpoint_root: str = "",
    task_name: str = "",
    run_key: str = "",
    run_name: str = "",
    experiment: str = "",
):
    """DetCon-B pretraining of the backbone on the images and their pseudo masks. INPUT_SIZE and
    LR 0: chosen from the images and the step budget (segflow.selfsl.config.auto_settings).
    PROCESSES and CHECKPOINT_ROOT: as for train_model."""
    options = dict(locals())  # the component's inputs, before any other name
    from segflow.configs import from_options
    from segflow.launch import run_task
    from segflow.selfsl.config import PretrainConfig
    from segflow.stages import log_metrics_to
    from segflow.tracking import RunContext

    cfg = from_options(
        PretrainConfig,
        options,
        (
            "images_uri",
            "backbone",
            "metrics",
            "model_name",
            "processes",
            "checkpoint_root",
            "task_name",
            "run_key",
            "run_name",
            "experiment",
        ),
        images=images_uri,
        out=backbone.path,
        masks=masks.path,
        model=model_name,
    )
    run = RunContext(run_key, run_name, experiment)
    result = run_task("pretrain", cfg, run, processes, checkpoint_root, task_name)
    backbone.metadata.update({"architecture": model_name, **result.metrics})
    log_metrics_to(metrics, result.metrics)
