"""Wiring that several pipelines share: train -> evaluate -> export -> register.

A plain function that adds the three tasks to the pipeline being defined. It is not a nested
``@dsl.pipeline``: the local runner (kfp.local 2.17) cannot run a nested pipeline whose optional
artifact input (the pretrained backbone) is left out, and the same graph must run locally and on
a cluster.
"""

from kfp.dsl import PipelineTask

from segflow_kfp.evaluate import evaluate_model
from segflow_kfp.export import export_model
from segflow_kfp.platform import on_cluster, resumable
from segflow_kfp.registry import register_model
from segflow_kfp.train import train_model


def train_evaluate_export_register(
    dataset,
    track: dict,
    export_precision: str = "fp32",
    init_backbone=None,
    registered_model="segflow",
    promotion_margin=0.0,
    source_fingerprint="",
    **train_args,
) -> tuple[PipelineTask, PipelineTask, PipelineTask]:
    """Train on ``dataset`` (from ``init_backbone`` when given), evaluate on its val subset, export
    the model to OpenVINO once the evaluation passed, and register the export under
    ``registered_model`` (champion / challenger); returns the train, evaluate and export tasks."""
    backbone = {"init_backbone": init_backbone} if init_backbone is not None else {}
    trained = train_model(dataset=dataset, **backbone, **train_args, **resumable(), **track)
    on_cluster(trained, gpu=True, cache=False)
    evaluated, exported = evaluate_export_register(
        trained.outputs["model"],
        dataset,
        track,
        export_precision,
        registered_model,
        promotion_margin,
        source_fingerprint=source_fingerprint,
    )
    return trained, evaluated, exported


def evaluate_export_register(
    model,
    dataset,
    track: dict,
    export_precision: str,
    registered_model,
    margin,
    source_fingerprint="",
    adapted_to="",
    headline: bool = True,
) -> tuple[PipelineTask, PipelineTask]:
    """Evaluate ``model`` on ``dataset``'s val subset, export it once the evaluation passed, and
    register the export (champion / challenger); returns the evaluate and export tasks.
    ``headline``: whether the evaluation's scores are the parent run's headline metrics."""
    evaluated = on_cluster(evaluate_model(model=model, dataset=dataset, headline=headline, **track), cache=False)
    exported = export_model(model=model, dataset=dataset, precision=export_precision, **track)
    on_cluster(exported.after(evaluated), cache=False)
    register(model, exported, evaluated, dataset, track, registered_model, margin, source_fingerprint, adapted_to)
    return evaluated, exported


def register(
    model, exported, evaluated, dataset, track: dict, registered_model, margin, source_fingerprint="", adapted_to=""
) -> PipelineTask:
    """The registration task of an exported model (its evaluation decides champion or challenger)."""
    task = register_model(
        model=model,
        ir=exported.outputs["ir"],
        evaluation=evaluated.outputs["evaluation"],
        dataset=dataset,
        registered_model=registered_model,
        margin=margin,
        source_fingerprint=source_fingerprint,
        adapted_to=adapted_to,
        **track,
    )
    return on_cluster(task, cpu="1", memory="4G", cache=False)
