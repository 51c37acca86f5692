"""Score a model on a dataset artifact: metrics, confusion matrix, pictures."""

from kfp import dsl
from kfp.dsl import Artifact, ClassificationMetrics, Dataset, Input, Markdown, Metrics, Model, Output

from segflow_kfp import SEGFLOW_IMAGE


@dsl.component(base_image=SEGFLOW_IMAGE, install_kfp_package=False)
def evaluate_model(
    model: Input[Model],
    dataset: Input[Dataset],
    evaluation: Output[Artifact],
    metrics: Output[Metrics],
    confusion: Output[ClassificationMetrics],
    report: Output[Markdown],
    subset: str = "val",
    baseline: Input[Model] = None,
    headline: bool = True,
    run_key: str = "",
    run_name: str = "",
    experiment: str = "",
):
    from segflow.evaluate.evaluation import EvalConfig
    from segflow.stages import evaluate_stage, log_metrics_to
    from segflow.tracking import RunContext

    cfg = EvalConfig(
        model=model.path,
        data=dataset.path,
        out=evaluation.path,
        subset=subset,
        baseline=baseline.path if baseline is not None else "",
        overwrite=True,
    )
    result = evaluate_stage(cfg, RunContext(run_key, run_name, experiment), markdown_out=report.path, headline=headline)
    log_metrics_to(metrics, result.metrics)
    confusion.log_confusion_matrix(result.labels, result.confusion_matrix)
    evaluation.metadata.update({"mDice": result.mDice, "mIoU": result.mIoU, "subset": subset})
