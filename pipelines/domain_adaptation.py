"""Adapt a model trained on a labelled source domain to an unlabelled target domain.

import source and target -> source-only training -> the adaptation methods as parallel branches
(AdaptSegNet single- and multi-level, MinEnt, AdvEnt, DACS) -> MinEnt + AdvEnt ensemble -> every
candidate evaluated on the target val subset (pictures beside the source-only model) -> the best
exported and registered under registered_model (@champion only when it beats the champion on the
target val subset by promotion_margin). The target's labels choose snapshots and candidates; they are never trained on.

    segflow run pipelines/domain_adaptation.py --local     # synthetic "game engine" -> "camera" data
    segflow compile pipelines/domain_adaptation.py --output domain_adaptation.yaml

Defaults are sized for the demo (64 px synthetic scenes on a CPU, a few minutes). For real data:
input_size=512, epochs=100, iterations=20000 and eval_every=1000.
"""

from kfp import dsl

from segflow_kfp.adapt import adapt_model, choose_best, ensemble_models
from segflow_kfp.data_import import import_data
from segflow_kfp.evaluate import evaluate_model
from segflow_kfp.flows import evaluate_export_register
from segflow_kfp.platform import on_cluster, resumable
from segflow_kfp.tracking import tracked
from segflow_kfp.train import train_model

# The branches: (method, levels). MinEnt and AdvEnt also form the ensemble (see ensemble_models).
BRANCHES = [
    {"method": "adaptsegnet", "levels": "single"},
    {"method": "adaptsegnet", "levels": "multi"},
    {"method": "minent", "levels": "single"},
    {"method": "advent", "levels": "single"},
    {"method": "dacs", "levels": "single"},
]


@dsl.pipeline(name="domain-adaptation", description="Source-only training, then adaptation to the target domain.")
def domain_adaptation(
    source_uri: str = "runs/demo/data/source",
    target_uri: str = "runs/demo/data/target",
    branches: list = BRANCHES,
    model_name: str = "lite_hrnet_s",
    epochs: int = 12,
    iters_per_epoch: int = 10,
    iterations: int = 120,
    eval_every: int = 40,
    batch_size: int = 8,
    input_size: int = 64,
    val_fraction: float = 0.2,
    export_precision: str = "fp32",
    seed: int = 0,
    registered_model: str = "segflow",
    promotion_margin: float = 0.0,
    experiment: str = "",
):
    track, exit_handler = tracked(experiment, "domain-adaptation", locals())
    with exit_handler:
        imports = {}
        for name, uri in (("source", source_uri), ("target", target_uri)):
            task = import_data(source_uri=uri, val_fraction=val_fraction, seed=seed, **track)
            imports[name] = on_cluster(task.set_display_name(f"import-{name}"), cache=False).outputs["dataset"]
        source, target = imports["source"], imports["target"]
        shape = {"batch_size": batch_size, "input_size": input_size, "seed": seed}
        trained = train_model(
            dataset=source,
            model_name=model_name,
            epochs=epochs,
            iters_per_epoch=iters_per_epoch,
            **shape,
            **resumable(),
            **track,
        )
        source_only = on_cluster(trained.set_display_name("train-source-only"), gpu=True, cache=False)
        source_eval = evaluate_model(model=source_only.outputs["model"], dataset=target, headline=False, **track)
        on_cluster(source_eval.set_display_name("evaluate-source-only"))

        steps = {"iterations": iterations, "eval_every": eval_every, **shape}
        with dsl.ParallelFor(items=branches) as branch:
            adapted = adapt_model(
                source=source,
                target=target,
                init=source_only.outputs["model"],
                method=branch.method,
                levels=branch.levels,
                **steps,
                **resumable(),
                **track,
            )
            on_cluster(adapted, gpu=True, cache=False)
            adapted_eval = evaluate_model(
                model=adapted.outputs["model"],
                dataset=target,
                baseline=source_only.outputs["model"],
                headline=False,
                **track,
            )
            on_cluster(adapted_eval)

        # MinEnt + AdvEnt, ADVENT's combination, from the branches' outputs.
        combined = ensemble_models(candidates=dsl.Collected(adapted.outputs["model"]), **track)
        on_cluster(combined)
        combined_eval = evaluate_model(
            model=combined.outputs["model"],
            dataset=target,
            baseline=source_only.outputs["model"],
            headline=False,
            **track,
        )
        on_cluster(combined_eval.set_display_name("evaluate-ensemble"))

        best = choose_best(
            adapted=dsl.Collected(adapted.outputs["model"]),
            adapted_evaluations=dsl.Collected(adapted_eval.outputs["evaluation"]),
            ensemble=combined.outputs["model"],
            ensemble_evaluation=combined_eval.outputs["evaluation"],
            source_only=source_only.outputs["model"],
            source_only_evaluation=source_eval.outputs["evaluation"],
            **track,
        )
        on_cluster(best)
        # Exported and registered like any model: compared with the champion on the target val
        # subset (choose-best already put the winner's scores on the parent run).
        best_eval, _ = evaluate_export_register(
            best.outputs["best"], target, track, export_precision, registered_model, promotion_margin, headline=False
        )
        best_eval.set_display_name("evaluate-best")
