"""Import a labelled dataset, train a Lite-HRNet on it, evaluate on its val subset.

segflow run pipelines/supervised.py --local                      # demo defaults
segflow run pipelines/supervised.py --local -p method=supcon
segflow compile pipelines/supervised.py --output supervised.yaml
"""

import sys
from pathlib import Path

from kfp import dsl

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `components` from this checkout

from components.data_import import import_data
from components.evaluate import evaluate_model
from components.export import export_model
from components.platform import on_cluster
from components.tracking import tracked
from components.train import train_model


@dsl.pipeline(name="supervised", description="Import, train (supervised / SupCon / Mean Teacher), evaluate.")
def supervised(
    data_uri: str = "runs/demo/data/target",
    unlabeled_uri: str = "",
    model_name: str = "lite_hrnet_s",
    method: str = "supervised",
    epochs: int = 12,
    batch_size: int = 8,
    input_size: int = 96,
    iters_per_epoch: int = 0,
    val_fraction: float = 0.2,
    export_precision: str = "fp32",
    seed: int = 0,
    experiment: str = "",
):
    track, exit_handler = tracked(experiment)
    with exit_handler:
        data = on_cluster(import_data(source_uri=data_uri, val_fraction=val_fraction, seed=seed, **track), cache=False)
        trained = train_model(
            dataset=data.outputs["dataset"],
            model_name=model_name,
            method=method,
            unlabeled_uri=unlabeled_uri,
            epochs=epochs,
            batch_size=batch_size,
            input_size=input_size,
            iters_per_epoch=iters_per_epoch,
            seed=seed,
            **track,
        )
        on_cluster(trained, gpu=True, cpu="4", memory="16G", cache=False)
        evaluated = evaluate_model(model=trained.outputs["model"], dataset=data.outputs["dataset"], **track)
        on_cluster(evaluated, cache=False)
        exported = export_model(
            model=trained.outputs["model"], dataset=data.outputs["dataset"], precision=export_precision, **track
        )
        on_cluster(exported.after(evaluated), cache=False)
