"""Register an exported model in the MLflow registry, and promote it to @champion when it is better."""

from kfp import dsl
from kfp.dsl import Artifact, Dataset, Input, Metrics, Model, Output

from segflow_kfp import SEGFLOW_IMAGE


@dsl.component(base_image=SEGFLOW_IMAGE, install_kfp_package=False)
def register_model(
    model: Input[Model],
    ir: Input[Model],
    evaluation: Input[Artifact],
    dataset: Input[Dataset],
    registration: Output[Metrics],
    registered_model: str = "segflow",
    margin: float = 0.0,
    source_fingerprint: str = "",
    adapted_to: str = "",
    run_key: str = "",
    run_name: str = "",
    experiment: str = "",
) -> str:
    """A new version of REGISTERED_MODEL (the IR, with its scores, fingerprints and pipeline run);
    @challenger always, @champion when it beats the champion by more than MARGIN (mDice, 0-1) on
    the same validation data. ADAPTED_TO: the fingerprint of the unlabelled images the model was
    adapted to (retrain's drift branch). Returns the decision: champion or challenger."""
    from segflow.stages import register_stage
    from segflow.tracking import RunContext

    result = register_stage(
        registered_model,
        model=model.path,
        evaluation=evaluation.path,
        dataset=dataset.path,
        model_id=ir.metadata.get("mlflow_model_id", ""),
        margin=margin,
        run=RunContext(run_key, run_name, experiment),
        artifact_uri=model.uri,
        source_fingerprint=source_fingerprint,
        training_data=dataset.uri,
        adapted_to=adapted_to,
    )
    registration.log_metric("version", result.version)
    registration.metadata.update({"decision": result.decision, "reason": result.reason})
    return result.decision
