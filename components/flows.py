"""Wiring that several pipelines share: train -> evaluate -> export.

A plain function that adds the three tasks to the pipeline being defined. It is not a nested
``@dsl.pipeline``: the local runner (kfp.local 2.17) cannot run a nested pipeline whose optional
artifact input (the pretrained backbone) is left out, and the same graph must run locally and on
a cluster.
"""

from kfp.dsl import PipelineTask

from segflow_components.evaluate import evaluate_model
from segflow_components.export import export_model
from segflow_components.platform import on_cluster, resumable
from segflow_components.train import train_model


def train_evaluate_export(
    dataset, track: dict, export_precision: str = "fp32", init_backbone=None, **train_args
) -> tuple[PipelineTask, PipelineTask, PipelineTask]:
    """Train on ``dataset`` (from ``init_backbone`` when given), evaluate on its val subset, and
    export the model to OpenVINO once the evaluation passed; returns the three tasks."""
    backbone = {"init_backbone": init_backbone} if init_backbone is not None else {}
    trained = train_model(dataset=dataset, **backbone, **train_args, **resumable(), **track)
    on_cluster(trained, gpu=True, cache=False)
    model = trained.outputs["model"]
    evaluated = on_cluster(evaluate_model(model=model, dataset=dataset, **track), cache=False)
    exported = export_model(model=model, dataset=dataset, precision=export_precision, **track)
    on_cluster(exported.after(evaluated), cache=False)
    return trained, evaluated, exported
