"""Retraining on new data: is the data new, judged by its fingerprint against the champion's?"""

from kfp import dsl

from segflow_kfp import SEGFLOW_IMAGE


@dsl.component(base_image=SEGFLOW_IMAGE, install_kfp_package=False)
def check_data(
    data_uri: str,
    registered_model: str,
    fingerprint: dsl.OutputPath(str),
    champion_model: dsl.OutputPath(str),
    champion_data: dsl.OutputPath(str),
    drift_threshold: float = 0.05,
    run_key: str = "",
    run_name: str = "",
    experiment: str = "",
) -> str:
    """Returns "same" (the champion was trained on exactly this data), "new" (labelled data to
    train on), "shifted" (unlabelled images whose drift score passes DRIFT_THRESHOLD: adapt the
    champion to them), "unlabelled" (no drift) or "adapted" (already adapted to them).
    FINGERPRINT: of DATA_URI's files; CHAMPION_MODEL: the champion's model artifact to fine-tune
    from ("" if none); CHAMPION_DATA: the dataset artifact it was trained on.

    The decision is the plain return value (output "Output"): kfp.local 2.17 resolves only that
    name in a dsl.If condition, so the other two are output files."""
    from pathlib import Path

    from segflow.stages import check_data_stage
    from segflow.tracking import RunContext

    result = check_data_stage(
        data_uri, registered_model, RunContext(run_key, run_name, experiment), threshold=drift_threshold
    )
    Path(fingerprint).write_text(result.fingerprint)
    Path(champion_model).write_text(result.champion_model)
    Path(champion_data).write_text(result.champion_data)
    return result.decision
