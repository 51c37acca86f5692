"""Retrain when new data lands: fingerprint, and only when the data is new, fine-tune the champion.

check the data's fingerprint against the champion's training data
  same    -> the parent run records "no new data"; nothing else runs
  new     -> import -> fine-tune from the champion (from scratch when there is none) -> evaluate ->
             export -> register: @challenger, and @champion when better by promotion_margin
  shifted -> (unlabelled images whose label-free drift score passes drift_threshold) adapt the
             champion to them (adapt_method; its training data is the labelled source) -> evaluate
             on the champion's validation data -> export -> register, tagged with the images it
             was adapted to; a later tick on the same images does nothing ("adapted")
  unlabelled images without drift -> nothing to do

    segflow run pipelines/retrain.py --local -p data_uri=runs/demo/data/target -p registered_model=street
    segflow schedule pipelines/retrain.py --cron "0 0 3 * * *" --host URL -p data_uri=s3://bucket/data/
"""

from kfp import dsl
from kfp.dsl import Dataset, Model

from segflow.lifecycle import Decision
from segflow_kfp.adapt import adapt_model
from segflow_kfp.data_import import import_data
from segflow_kfp.flows import evaluate_export_register, train_evaluate_export_register
from segflow_kfp.lifecycle import check_data
from segflow_kfp.platform import on_cluster, resumable
from segflow_kfp.tracking import tracked


@dsl.pipeline(name="retrain", description="Fine-tune the champion on new data; promote the better model.")
def retrain(
    data_uri: str = "runs/demo/data/target",
    registered_model: str = "segflow",
    promotion_margin: float = 0.0,
    model_name: str = "lite_hrnet_s",
    epochs: int = 12,
    batch_size: int = 8,
    input_size: int = 96,
    iters_per_epoch: int = 0,
    val_fraction: float = 0.2,
    export_precision: str = "fp32",
    seed: int = 0,
    drift_threshold: float = 0.05,
    adapt_method: str = "dacs",
    adapt_iterations: int = 200,
    adapt_eval_every: int = 50,
    experiment: str = "",
):
    track, exit_handler = tracked(experiment, "retrain", locals())
    with exit_handler:
        check = check_data(
            data_uri=data_uri, registered_model=registered_model, drift_threshold=drift_threshold, **track
        )
        on_cluster(check, cpu="1", memory="2G", cache=False)
        with dsl.If(check.outputs["Output"] == Decision.NEW.value, name="new-data"):
            data = import_data(source_uri=data_uri, val_fraction=val_fraction, seed=seed, **track)
            on_cluster(data, cache=False)
            train_evaluate_export_register(
                data.outputs["dataset"],
                track,
                export_precision=export_precision,
                registered_model=registered_model,
                promotion_margin=promotion_margin,
                source_fingerprint=check.outputs["fingerprint"],
                init_model_uri=check.outputs["champion_model"],
                model_name=model_name,
                epochs=epochs,
                batch_size=batch_size,
                input_size=input_size,
                iters_per_epoch=iters_per_epoch,
                seed=seed,
            )
        with dsl.If(check.outputs["Output"] == Decision.SHIFTED.value, name="adapt-to-drift"):
            # The URIs are known only at run time: importers turn them into artifacts.
            source = dsl.importer(artifact_uri=check.outputs["champion_data"], artifact_class=Dataset, reimport=False)
            champion = dsl.importer(artifact_uri=check.outputs["champion_model"], artifact_class=Model, reimport=False)
            images = dsl.importer(artifact_uri=data_uri, artifact_class=Dataset, reimport=False)
            for task, name in ((source, "source-data"), (champion, "champion-model"), (images, "drifted-images")):
                task.set_display_name(name)
            adapted = adapt_model(
                source=source.output,
                target=images.output,
                init=champion.output,
                method=adapt_method,
                levels="single",
                iterations=adapt_iterations,
                eval_every=adapt_eval_every,
                batch_size=batch_size,
                input_size=input_size,
                seed=seed,
                **resumable(),
                **track,
            )
            on_cluster(adapted, gpu=True, cache=False)
            # Scored on the champion's own validation data: the only labels there are.
            evaluate_export_register(
                adapted.outputs["model"],
                source.output,
                track,
                export_precision,
                registered_model,
                promotion_margin,
                adapted_to=check.outputs["fingerprint"],
            )
