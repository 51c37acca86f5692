"""Close the MLflow parent run of a pipeline run (stages open it: see segflow.tracking)."""

from kfp import dsl

from segflow_kfp import SEGFLOW_IMAGE


@dsl.component(base_image=SEGFLOW_IMAGE, install_kfp_package=False)
def finish_tracking(
    run_key: str,
    status: dsl.PipelineTaskFinalStatus,
    experiment: str = "",
    run_name: str = "",
    pipeline: str = "",
    params: dict = {},  # noqa: B006 (KFP needs the default in the signature; it is never mutated)
):
    """Exit handler: the pipeline's parameters and code tags onto the parent run, then mark it
    FINISHED or FAILED with the pipeline's outcome."""
    from segflow import tracking

    tracking.end_pipeline_run(
        run_key,
        succeeded=status.state == "SUCCEEDED",
        experiment=experiment or None,
        run_name=run_name,
        pipeline=pipeline,
        params=params,
    )


def run_context(experiment: str) -> dict:
    """Arguments that tie a stage's MLflow run to its pipeline run; KFP fills in the placeholders."""
    return {
        "run_key": dsl.PIPELINE_JOB_ID_PLACEHOLDER,
        "run_name": dsl.PIPELINE_JOB_NAME_PLACEHOLDER,
        "experiment": experiment,
    }


def _scalars(params: dict) -> dict:
    """The pipeline's string, number and boolean parameters: those MLflow shows as params. (A list
    parameter does not survive being embedded in a dict input; it is logged by its stages.)"""
    from kfp.dsl.pipeline_channel import PipelineChannel

    scalar = {"String", "Integer", "Float", "Boolean"}
    return {k: v for k, v in params.items() if not isinstance(v, PipelineChannel) or v.channel_type in scalar}


def tracked(experiment: str, pipeline: str = "", params: dict | None = None) -> tuple[dict, dsl.ExitHandler]:
    """(stage arguments, exit handler) of a tracked pipeline: stages inside the handler nest under
    one MLflow parent run, which the handler closes FINISHED or FAILED, after logging ``params``
    (the pipeline's parameters: pass ``locals()`` first thing in the pipeline function) on it.

        track, exit_handler = tracked(experiment, "supervised", locals())
    """
    from segflow_kfp.platform import on_cluster

    track = run_context(experiment)
    finish = finish_tracking(
        run_key=track["run_key"],
        run_name=track["run_name"],
        experiment=experiment,
        pipeline=pipeline,
        params=_scalars(params or {}),
    )
    on_cluster(finish, cpu="0.5", memory="1G", cache=False)
    return track, dsl.ExitHandler(finish, name="tracked")
