"""Close the MLflow parent run of a pipeline run (stages open it: see segflow.tracking)."""

from kfp import dsl

from segflow_components import SEGFLOW_IMAGE


@dsl.component(base_image=SEGFLOW_IMAGE, install_kfp_package=False)
def finish_tracking(run_key: str, status: dsl.PipelineTaskFinalStatus, experiment: str = ""):
    """Exit handler: mark the parent run FINISHED or FAILED with the pipeline's outcome."""
    from segflow import tracking

    tracking.end_pipeline_run(run_key, succeeded=status.state == "SUCCEEDED", experiment=experiment or None)


def run_context(experiment: str) -> dict:
    """Arguments that tie a stage's MLflow run to its pipeline run; KFP fills in the placeholders."""
    return {
        "run_key": dsl.PIPELINE_JOB_ID_PLACEHOLDER,
        "run_name": dsl.PIPELINE_JOB_NAME_PLACEHOLDER,
        "experiment": experiment,
    }


def tracked(experiment: str) -> tuple[dict, dsl.ExitHandler]:
    """(stage arguments, exit handler) of a tracked pipeline: stages inside the handler nest under
    one MLflow parent run, which the handler closes FINISHED or FAILED."""
    from segflow_components.platform import on_cluster

    track = run_context(experiment)
    finish = finish_tracking(run_key=track["run_key"], experiment=experiment)
    on_cluster(finish, cpu="0.5", memory="1G", cache=False)
    return track, dsl.ExitHandler(finish, name="tracked")
