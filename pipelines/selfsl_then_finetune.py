"""Learn from unlabelled images, then fine-tune on the few labelled ones.

import labelled data -> pseudo masks (Felzenszwalb) -> DetCon pretraining -> fine-tune
(plain or SupCon) -> evaluate -> OpenVINO export; one MLflow parent run, a nested run per stage.

    segflow run pipelines/selfsl_then_finetune.py --local     # the demo: synthetic data from `make demo`
    segflow compile pipelines/selfsl_then_finetune.py --output selfsl_then_finetune.yaml
    kfp run create -e segflow -r my-run -f selfsl_then_finetune.yaml data_uri=s3://... unlabeled_uri=s3://...

Felzenszwalb scale and minimum size, the pretraining view size, steps per epoch and learning rate
are chosen from the unlabelled images when left at 0 ("auto" rules, docs/methods.md; the chosen values are logged as
auto.* params of the pseudo-masks and pretrain runs). The other defaults are sized for the demo
(96 px images, CPU: `make demo` in about 4 minutes with its install); for real data, pretrain and
fine-tune longer and larger (more pretrain_epochs; input_size=512, epochs=300).
"""

from kfp import dsl

from segflow_kfp.data_import import import_data
from segflow_kfp.flows import train_evaluate_export_register
from segflow_kfp.platform import on_cluster, resumable
from segflow_kfp.selfsl import pretrain_backbone, pseudo_masks
from segflow_kfp.tracking import tracked


@dsl.pipeline(name="selfsl-then-finetune", description="DetCon self-supervised pretraining, then fine-tuning.")
def selfsl_then_finetune(
    data_uri: str = "runs/demo/data/target",
    unlabeled_uri: str = "runs/demo/data/unlabeled",
    model_name: str = "lite_hrnet_s",
    finetune_method: str = "supervised",
    felzenszwalb_scale: float = 0.0,
    felzenszwalb_min_size: int = 0,
    pretrain_epochs: int = 6,  # x 50 steps on the demo's 96 images (the auto steps-per-epoch rule)
    pretrain_batch_size: int = 16,
    pretrain_input_size: int = 0,
    pretrain_lr: float = 0.0,
    pretrain_iters_per_epoch: int = 0,
    epochs: int = 12,
    batch_size: int = 8,
    input_size: int = 96,
    iters_per_epoch: int = 0,
    val_fraction: float = 0.2,
    export_precision: str = "fp32",
    seed: int = 0,
    registered_model: str = "segflow",
    promotion_margin: float = 0.0,
    experiment: str = "",
):
    track, exit_handler = tracked(experiment, "selfsl-then-finetune", locals())
    with exit_handler:
        data = on_cluster(import_data(source_uri=data_uri, val_fraction=val_fraction, seed=seed, **track), cache=False)
        masks = on_cluster(
            pseudo_masks(images_uri=unlabeled_uri, scale=felzenszwalb_scale, min_size=felzenszwalb_min_size, **track),
            cpu="4",
            cache=False,
        )
        backbone = pretrain_backbone(
            images_uri=unlabeled_uri,
            masks=masks.outputs["masks"],
            model_name=model_name,
            epochs=pretrain_epochs,
            batch_size=pretrain_batch_size,
            input_size=pretrain_input_size,
            lr=pretrain_lr,
            iters_per_epoch=pretrain_iters_per_epoch,
            seed=seed,
            **resumable(),
            **track,
        )
        on_cluster(backbone, gpu=True, cache=False)
        train_evaluate_export_register(
            data.outputs["dataset"],
            track,
            export_precision=export_precision,
            registered_model=registered_model,
            promotion_margin=promotion_margin,
            init_backbone=backbone.outputs["backbone"],
            model_name=model_name,
            method=finetune_method,
            epochs=epochs,
            batch_size=batch_size,
            input_size=input_size,
            iters_per_epoch=iters_per_epoch,
            seed=seed,
        )
