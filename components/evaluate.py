"""Score a model on a dataset artifact: metrics, confusion matrix, pictures."""

from kfp import dsl
from kfp.dsl import Artifact, ClassificationMetrics, Dataset, Input, Markdown, Metrics, Model, Output

from components import SEGFLOW_IMAGE


@dsl.component(base_image=SEGFLOW_IMAGE, install_kfp_package=False)
def evaluate_model(
    model: Input[Model],
    dataset: Input[Dataset],
    evaluation: Output[Artifact],
    metrics: Output[Metrics],
    confusion: Output[ClassificationMetrics],
    report: Output[Markdown],
    subset: str = "val",
    run_key: str = "",
    run_name: str = "",
    experiment: str = "",
):
    from segflow.evaluate.evaluation import EvalConfig
    from segflow.stages import evaluate_stage
    from segflow.tracking import RunContext

    cfg = EvalConfig(model=model.path, data=dataset.path, out=evaluation.path, subset=subset)
    result = evaluate_stage(cfg, RunContext(run_key, run_name, experiment), markdown_out=report.path)
    for key in ("mDice", "mIoU", "pixel_accuracy"):
        metrics.log_metric(key, result[key])
    for name, scores in result["per_class"].items():
        if scores["dice"] is not None:
            metrics.log_metric(f"dice_{name}", scores["dice"])
    confusion.log_confusion_matrix(result["labels"], result["confusion_matrix"])
    evaluation.metadata.update({"mDice": result["mDice"], "mIoU": result["mIoU"], "subset": subset})
