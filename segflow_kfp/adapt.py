"""Domain adaptation: adapt a source-trained model to a target domain; ensembles of models."""

from typing import Optional

from kfp import dsl
from kfp.dsl import Artifact, Dataset, Input, Markdown, Metrics, Model, Output

from segflow_kfp import SEGFLOW_GPU_IMAGE, SEGFLOW_IMAGE


@dsl.component(base_image=SEGFLOW_GPU_IMAGE, install_kfp_package=False)
def adapt_model(
    source: Input[Dataset],
    target: Input[Dataset],
    init: Input[Model],
    model: Output[Model],
    metrics: Output[Metrics],
    method: str = "adaptsegnet",
    levels: str = "multi",
    iterations: int = 1000,
    eval_every: int = 100,
    batch_size: int = 8,
    input_size: int = 0,
    lr: float = 0.0001,
    adv_weight: Optional[float] = None,  # noqa: UP045 (kfp reads the annotation: Optional, not "| None")
    ent_weight: float = 1.0,
    disc_pool: int = 4,
    mix_weighting: str = "pixel",
    select: str = "auto",
    seed: int = 0,
    processes: int = 0,
    checkpoint_root: str = "",
    task_name: str = "",
    run_key: str = "",
    run_name: str = "",
    experiment: str = "",
):
    """METHOD: adaptsegnet, minent, advent, dacs (or source, the control). TARGET's labels choose
    the snapshot (val mDice) and are never trained on; SELECT as for `segflow adapt --select`.
    INPUT_SIZE 0: the INIT model's. PROCESSES and CHECKPOINT_ROOT: as for
    train_model."""
    options = dict(locals())  # the component's inputs, before any other name
    from segflow.adapt.config import AdaptConfig
    from segflow.configs import from_options
    from segflow.launch import run_task
    from segflow.lifecycle import candidate_name
    from segflow.stages import log_metrics_to
    from segflow.tracking import RunContext

    cfg = from_options(
        AdaptConfig,
        options,
        ("metrics", "processes", "checkpoint_root", "task_name", "run_key", "run_name", "experiment"),
        source=source.path,
        target=target.path,
        init=init.path,
        out=model.path,
        model="",  # the architecture: the --init model's (the component's `model` is its output)
    )
    run = RunContext(run_key, run_name, experiment)
    result = run_task("adapt", cfg, run, processes, checkpoint_root, task_name)
    name = candidate_name(result.method, levels)
    model.metadata.update({"candidate": name, "method": result.method, "selection": result.selection})
    log_metrics_to(metrics, result.metrics)


@dsl.component(base_image=SEGFLOW_IMAGE, install_kfp_package=False)
def ensemble_models(
    candidates: Input[list[Model]],
    model: Output[Model],
    members: list = ["minent", "advent"],  # noqa: B006 (a KFP default, never mutated)
    name: str = "minent+advent",
    run_key: str = "",
    run_name: str = "",
    experiment: str = "",
):
    """One model averaging the softmax of the CANDIDATES named in MEMBERS (ADVENT's MinEnt + AdvEnt)."""
    from segflow.lifecycle import pick_members
    from segflow.stages import ensemble_stage
    from segflow.tracking import RunContext

    paths = pick_members({m.metadata["candidate"]: m.path for m in candidates}, members)
    ensemble_stage(paths, model.path, overwrite=True, run=RunContext(run_key, run_name, experiment))
    model.metadata.update({"candidate": name, "method": "ensemble", "members": members})


@dsl.component(base_image=SEGFLOW_IMAGE, install_kfp_package=False)
def choose_best(
    adapted: Input[list[Model]],
    adapted_evaluations: Input[list[Artifact]],
    ensemble: Input[Model],
    ensemble_evaluation: Input[Artifact],
    source_only: Input[Model],
    source_only_evaluation: Input[Artifact],
    best: Output[Model],
    report: Output[Markdown],
    metrics: Output[Metrics],
    metric: str = "mDice",
    run_key: str = "",
    run_name: str = "",
    experiment: str = "",
):
    """The candidate with the highest METRIC on the target val subset; the comparison table and
    bar chart go to the MLflow parent run."""
    from segflow.lifecycle import candidate_table
    from segflow.stages import choose_stage, log_metrics_to
    from segflow.tracking import RunContext

    candidates = candidate_table(
        (source_only.path, source_only_evaluation.path),
        [(m.metadata["candidate"], m.path, e.path) for m, e in zip(adapted, adapted_evaluations, strict=True)],
        (ensemble.metadata.get("candidate", "ensemble"), ensemble.path, ensemble_evaluation.path),
    )
    result = choose_stage(
        candidates,
        best.path,
        metric,
        markdown_out=report.path,
        run=RunContext(run_key, run_name, experiment),
        overwrite=True,  # the output path is this task's own
    )
    best.metadata.update({"candidate": result.best, "metric": metric})
    log_metrics_to(metrics, result.metrics)
