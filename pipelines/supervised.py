"""Import a labelled dataset, train a Lite-HRNet on it, evaluate on its val subset, export it.

segflow run pipelines/supervised.py --local                      # demo defaults
segflow run pipelines/supervised.py --local -p method=supcon
segflow run pipelines/supervised.py --local -p tile=256          # large images: native-resolution tiles
segflow compile pipelines/supervised.py --output supervised.yaml
"""

from kfp import dsl

from segflow_kfp.data_import import import_data
from segflow_kfp.flows import train_evaluate_export_register
from segflow_kfp.platform import on_cluster
from segflow_kfp.tracking import tracked


@dsl.pipeline(name="supervised", description="Import, train (supervised / SupCon / Mean Teacher), evaluate, export.")
def supervised(
    data_uri: str = "runs/demo/data/target",
    unlabeled_uri: str = "",
    model_name: str = "lite_hrnet_s",
    method: str = "supervised",
    epochs: int = 12,
    batch_size: int = 8,
    input_size: int = 96,
    iters_per_epoch: int = 0,
    tile: int = 0,
    tile_overlap: float = 0.25,
    val_fraction: float = 0.2,
    export_precision: str = "fp32",
    seed: int = 0,
    registered_model: str = "segflow",
    promotion_margin: float = 0.0,
    experiment: str = "",
):
    track, exit_handler = tracked(experiment, "supervised", locals())
    with exit_handler:
        data = on_cluster(import_data(source_uri=data_uri, val_fraction=val_fraction, seed=seed, **track), cache=False)
        train_evaluate_export_register(
            data.outputs["dataset"],
            track,
            export_precision=export_precision,
            registered_model=registered_model,
            promotion_margin=promotion_margin,
            model_name=model_name,
            method=method,
            unlabeled_uri=unlabeled_uri,
            epochs=epochs,
            batch_size=batch_size,
            input_size=input_size,
            iters_per_epoch=iters_per_epoch,
            tile=tile,
            tile_overlap=tile_overlap,
            seed=seed,
        )
