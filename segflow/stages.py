"""Each pipeline stage as one call: storage at the edges, the library's work, its MLflow run.

The CLI, the KFP components and the tests call these, so a stage behaves the same on a laptop
and in a cluster. A stage:

1. checks its settings;
2. opens its output (checked before any work, locked, published only when complete) and brings
   s3:// inputs to local folders (artifacts only when sealed; raw data and images as they are);
3. calls one library function on local paths;
4. returns its typed result (``segflow.results``). Its ``metrics`` (numbers) are the stage's
   headline figures: MLflow and the KFP Metrics artifact both log them, so they are chosen once, here.

In a distributed run (torchrun) only rank 0 publishes and tracks.
"""

from __future__ import annotations

import contextlib
import json
import re
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

from segflow import lifecycle, storage, tracking
from segflow.adapt.adaptation import adapt
from segflow.adapt.config import AdaptConfig
from segflow.data import manifest as manifest_lib
from segflow.data.datasets import image_files
from segflow.data.importer import ImportConfig, import_dataset
from segflow.errors import SegflowError
from segflow.evaluate import comparison, drift
from segflow.evaluate.evaluation import EvalConfig, render_markdown, run_evaluation
from segflow.export.openvino_ir import ExportConfig, export
from segflow.export.predict import PredictConfig, input_files, predict
from segflow.models import artifact as model_artifact
from segflow.results import (
    AdaptResult,
    CheckDataResult,
    ChooseResult,
    ConvertResult,
    EnsembleResult,
    EvaluateResult,
    ExportResult,
    ImportResult,
    PredictResult,
    PretrainResult,
    PseudoMasksResult,
    RegisterResult,
    TrainResult,
)
from segflow.selfsl.config import PretrainConfig
from segflow.selfsl.pretraining import train_detcon
from segflow.selfsl.pseudo_masks import FelzenszwalbParams, default_mask_dir, make_pseudo_masks
from segflow.train.config import TrainConfig
from segflow.train.distributed import Dist, is_main_process
from segflow.train.segmentation import train_segmenter


@contextlib.contextmanager
def _optional_input(uri: str, what: str, sealed: bool = True) -> Iterator[Path | None]:
    if not uri:
        yield None
        return
    with storage.local_input(uri, what, sealed=sealed) as path:
        yield path


def log_metrics_to(artifact, metrics: dict) -> None:
    """A stage's metrics into a KFP Metrics artifact (anything with ``log_metric``)."""
    for name, value in metrics.items():
        if value is not None:
            artifact.log_metric(name, float(value))


def import_stage(
    cfg: ImportConfig, run: tracking.RunContext | None = None, markdown_out: str | None = None, track: bool = True
) -> ImportResult:
    """Import and validate a dataset; log config, fingerprint, counts and the report to MLflow.

    ``markdown_out``: also write the report there as one self-contained Markdown file (plot
    inlined), which is what the KFP UI can show.
    """
    cfg.validate()
    label = str(cfg.source).rstrip("/").rsplit("/", 1)[-1]
    with (
        tracking.stage_log("import", cfg, run, label, enabled=track) as log,
        storage.staged_output(cfg.out, cfg.overwrite, inputs={"SRC": cfg.source, "--masks": cfg.masks}) as out,
        storage.local_input(cfg.source, "dataset", sealed=False) as src,  # raw data: no marker needed
        _optional_input(cfg.masks, "--masks", sealed=False) as masks,
    ):
        report = import_dataset(cfg, src, out, masks)
        log.tag(tracking.FINGERPRINT_TAG, report["fingerprint"])
        log.result(report, "report.json", files=[out / "report.md", out / "class_distribution.png"])
        if markdown_out:
            plot = out / "class_distribution.png"
            _write(markdown_out, manifest_lib.render_markdown(report, plot, embed_plot=True))
    return ImportResult.of(report)


def train_stage(cfg: TrainConfig, run: tracking.RunContext | None = None, track: bool = True) -> TrainResult:
    """Train a model; per-epoch metrics, the summary and the model's config go to MLflow."""
    cfg.validate()
    main = is_main_process()
    unlabeled = cfg.mean_teacher.unlabeled if cfg.mean_teacher else ""
    with (
        tracking.stage_log("train", cfg, run, f"{cfg.model} {cfg.method}", enabled=track and main) as log,
        storage.staged_output(cfg.out, cfg.overwrite, main, _train_inputs(cfg, unlabeled)) as out,
        storage.local_input(cfg.data, "--data") as data,
        _optional_input(unlabeled, "--unlabeled", sealed=False) as unlabeled_dir,
        _optional_input(cfg.init_backbone, "--init-backbone") as backbone,
        _optional_input(cfg.init_model, "--init-model") as init_model,
    ):
        checkpoints = _checkpoints(cfg.out, cfg.checkpoint_dir, cfg.resume, main)
        each_epoch = _pushing(checkpoints, log.epoch)
        result = train_segmenter(
            cfg, data, out, checkpoints.local, unlabeled_dir, backbone, on_epoch=each_epoch, init_model_dir=init_model
        )
        log.tag(tracking.FINGERPRINT_TAG, result["dataset_fingerprint"])
        log.result(result, "training.json")
        training = (dataset_ref(data, cfg.data, "training"),)
        log.headline(run, {"train_seconds": result["metrics"]["train_seconds"]}, training)
    if main:
        checkpoints.discard()
    return TrainResult.of(result)


def _train_inputs(cfg: TrainConfig, unlabeled: str) -> storage.Inputs:
    return {
        "--data": cfg.data,
        "--unlabeled": unlabeled,
        "--init-backbone": cfg.init_backbone,
        "--init-model": cfg.init_model,
    }


def dataset_ref(local: Path, uri: str, context: str) -> tracking.DatasetRef:
    """A dataset artifact as an MLflow run input: named for the data it was imported from."""
    manifest = json.loads((Path(local) / manifest_lib.MANIFEST).read_text())
    source = str(manifest.get("source", {}).get("uri", "") or uri).rstrip("/")
    return tracking.DatasetRef(source.rsplit("/", 1)[-1] or "dataset", str(uri), manifest["fingerprint"], context)


def headline_scores(metrics: dict, subset: str) -> dict:
    """An evaluation's headline metrics for the parent run: the same names in every pipeline."""
    scores = {f"{subset}_mDice": metrics["mDice"], f"{subset}_mIoU": metrics["mIoU"]}
    for name, value in metrics["per_class"].items():
        if value["dice"] is not None:
            scores[f"{subset}_dice_{_metric_name(name)}"] = value["dice"]
    return scores


def _metric_name(text: str) -> str:
    """MLflow metric names take letters, digits, _ - . / and spaces only."""
    return re.sub(r"[^\w.\- /]", "_", text)


def _checkpoints(out: str, explicit: str, resume: bool, main: bool) -> storage.Checkpoints:
    """A training stage's checkpoints; with --resume, pulled from an s3:// checkpoint prefix
    first when this machine has none (a retried task in a fresh pod). One process pulls, the
    others (torchrun, same pod) wait for it."""
    checkpoints = storage.Checkpoints(out, explicit)
    if resume and main:
        checkpoints.pull()
    Dist().start().barrier()
    return checkpoints


def _pushing(checkpoints: storage.Checkpoints, each_epoch: Callable[[int, dict], None]) -> Callable[[int, dict], None]:
    """The per-epoch callback (rank 0, after the epoch's checkpoint is written), pushing it too."""

    def after_epoch(epoch: int, record: dict) -> None:
        checkpoints.push()
        each_epoch(epoch, record)

    return after_epoch


def pseudo_masks_stage(
    images: str,
    out: str = "",
    params: FelzenszwalbParams | None = None,
    workers: int = 0,
    run: tracking.RunContext | None = None,
    track: bool = True,
    overwrite: bool = False,
) -> PseudoMasksResult:
    """Felzenszwalb pseudo masks of a folder of images.

    Local images, local masks: the mask folder is a cache, updated in place (a mask is reused when
    its image and parameters match). With s3:// on either side, the masks are made into a new
    output, published whole like any artifact.
    """
    params = params or FelzenszwalbParams()
    config = {"images": images, "out": out, **params.__dict__}
    with tracking.stage_log("pseudo_masks", config, run, enabled=track) as log:
        if not storage.is_s3(images) and not storage.is_s3(out):
            result = make_pseudo_masks(Path(images), Path(out) if out else None, params, workers, replace=overwrite)
        else:
            if not out:
                raise SegflowError("pseudo masks of s3:// images need --out (a local folder or s3:// prefix).")
            with (
                storage.staged_output(out, overwrite, inputs={"IMAGES": images}) as stage,
                storage.local_input(images, "IMAGES", sealed=False) as folder,
            ):
                result = make_pseudo_masks(folder, stage, params, workers) | {"out": out}
        result["metrics"] = {k: result[k] for k in ("images", "made", "reused", "segments_per_image")}
        log.chosen(_masks_chosen(result))
        log.result(result)
    return PseudoMasksResult.of(result)


def detcon_masks_dir(cfg: PretrainConfig, images: Path) -> Path:
    return Path(cfg.masks) if cfg.masks else default_mask_dir(images)


def detcon_masks(cfg: PretrainConfig, images: Path) -> tuple[Path, dict]:
    """The pseudo masks DetCon trains on: ``--masks`` or detcon_mask/ beside the images, made when missing."""
    masks = detcon_masks_dir(cfg, images)
    return masks, make_pseudo_masks(images, masks, cfg.felzenszwalb)


def _masks_chosen(made: dict) -> dict:
    """The Felzenszwalb parameters a run used and why, as "auto" settings to log."""
    if not made:
        return {}
    chosen = {f"felzenszwalb.{k}": v for k, v in made["params"].items()}
    return chosen | {"felzenszwalb_rule": made["params_chosen_by"], "segments_per_image": made["segments_per_image"]}


def pretrain_stage(cfg: PretrainConfig, run: tracking.RunContext | None = None, track: bool = True) -> PretrainResult:
    """DetCon pretraining (pseudo masks first, when missing); per-epoch loss to MLflow."""
    cfg.validate()
    main = is_main_process()
    with (
        tracking.stage_log("pretrain", cfg, run, f"{cfg.model} detcon", enabled=track and main) as log,
        storage.staged_output(cfg.out, cfg.overwrite, main, {"--images": cfg.images, "--masks": cfg.masks}) as out,
        storage.local_input(cfg.images, "--images", sealed=False) as images,
    ):
        # One process makes the masks and the others (torchrun) wait for them, unless every process
        # has its own download of s3:// images, beside which each makes its own.
        dist = Dist().start()
        own_copy = storage.is_s3(cfg.images)
        masks, made = detcon_masks(cfg, images) if main or own_copy else (detcon_masks_dir(cfg, images), {})
        dist.barrier()
        checkpoints = _checkpoints(cfg.out, cfg.checkpoint_dir, cfg.resume, main)
        result = train_detcon(cfg, images, masks, out, checkpoints.local, on_epoch=_pushing(checkpoints, log.epoch))
        result["pseudo_masks"] = made
        log.chosen(result["chosen"] | _masks_chosen(made))
        log.result(result, "pretraining.json")
    if main:
        checkpoints.discard()
    return PretrainResult.of(result)


def adapt_stage(
    cfg: AdaptConfig,
    run: tracking.RunContext | None = None,
    track: bool = True,
    on_epoch: Callable[[int, dict], None] | None = None,
) -> AdaptResult:
    """Domain adaptation from a source-trained model; curves (segmentation and adversarial losses,
    discriminator accuracy, target entropy, target mIoU when known) go to MLflow."""
    cfg.validate()
    main = is_main_process()
    with (
        tracking.stage_log("adapt", cfg, run, cfg.method, enabled=track and main) as log,
        storage.staged_output(
            cfg.out, cfg.overwrite, main, {"--source": cfg.source, "--target": cfg.target, "--init": cfg.init}
        ) as out,
        storage.local_input(cfg.source, "--source") as source,
        storage.local_input(cfg.target, "--target", sealed=False) as target,  # images, or a dataset
        storage.local_input(cfg.init, "--init") as init,
    ):
        checkpoints = _checkpoints(cfg.out, cfg.checkpoint_dir, cfg.resume, main)

        def each_snapshot(epoch: int, record: dict) -> None:
            log.epoch(epoch, record)
            if on_epoch is not None:
                on_epoch(epoch, record)

        result = adapt(cfg, source, target, init, out, checkpoints.local, on_epoch=_pushing(checkpoints, each_snapshot))
        log.tag(tracking.FINGERPRINT_TAG, result["source_fingerprint"])
        log.result(result, "training.json")
        sets = [dataset_ref(source, cfg.source, "training")]
        if (target / manifest_lib.MANIFEST).exists():  # a dataset; plain images are not an artifact
            sets.append(dataset_ref(target, cfg.target, "target"))
        log.headline(run, datasets=tuple(sets))
    if main:
        checkpoints.discard()
    return AdaptResult.of(result)


def ensemble_stage(
    models: list[str], out: str, overwrite: bool = False, run=None, track: bool = True
) -> EnsembleResult:
    """One model that averages the members' softmax (e.g. MinEnt + AdvEnt)."""
    with (
        tracking.stage_log("ensemble", {"models": models, "out": out}, run, enabled=track) as log,
        storage.staged_output(out, overwrite, inputs={f"--models {m}": m for m in models}) as folder,
        contextlib.ExitStack() as inputs,
    ):
        local = [inputs.enter_context(storage.local_input(m, "--models")) for m in models]
        config = model_artifact.save_ensemble(folder, local)
        result = {"members": models, "labels": config["labels"], "metrics": {"members": len(models)}}
        log.result(result, "ensemble.json")
    return EnsembleResult.of(result)


def choose_stage(
    candidates: dict[str, tuple[str, str]],
    out: str,
    metric: str = "mDice",
    markdown_out: str | None = None,
    run: tracking.RunContext | None = None,
    track: bool = True,
    overwrite: bool = False,
) -> ChooseResult:
    """The best of several models by an evaluation ``metric``: ``candidates`` maps a name to
    (model folder, its evaluation folder). The best model is copied to ``out``; the comparison
    (table and bar chart) goes to the pipeline's parent MLflow run, where all runs compare."""
    with (
        tracking.stage_log("choose", {"metric": metric, "candidates": sorted(candidates)}, run, enabled=track) as log,
        storage.staged_output(out, overwrite) as folder,
        contextlib.ExitStack() as inputs,
    ):
        rows = []
        for name, (model_uri, evaluation_uri) in candidates.items():
            evaluation = inputs.enter_context(storage.local_input(evaluation_uri, "evaluation"))
            scores = json.loads((evaluation / "metrics.json").read_text())
            rows.append({"candidate": name, "mIoU": scores["mIoU"], "mDice": scores["mDice"], "model": model_uri})
        best = comparison.best_of(rows, metric)
        with storage.local_input(best["model"], "model") as model_dir:
            shutil.copytree(model_dir, folder, dirs_exist_ok=True)
        markdown = f"# Candidates, by {metric} on the target val subset\n\n" + comparison.table(rows, metric)
        with tempfile.TemporaryDirectory() as tmp:
            chart = comparison.chart(rows, Path(tmp) / "comparison.png")
            log.to_parent(run, markdown, chart, rows)
            if markdown_out:
                _write(markdown_out, markdown + "\n" + _inline_png(chart))
        best_scores = json.loads(
            (
                inputs.enter_context(storage.local_input(candidates[best["candidate"]][1], "evaluation"))
                / "metrics.json"
            ).read_text()
        )
        log.headline(run, headline_scores(best_scores, best_scores.get("subset", "val")))
        result = {"best": best["candidate"], "candidates": rows, "metric": metric}
        # MLflow metric names take no "+": "minent+advent" is logged as mDice_minent_advent.
        per_candidate = {re.sub(r"[^\w.\- ]", "_", f"{metric}_{r['candidate']}"): r[metric] for r in rows}
        result["metrics"] = per_candidate | {f"best_{metric}": best[metric]}
        log.result(result, "comparison.json")
    return ChooseResult.of(result)


def _inline_png(path: Path) -> str:
    import base64

    return f"![comparison](data:image/png;base64,{base64.b64encode(path.read_bytes()).decode()})\n"


def evaluate_stage(
    cfg: EvalConfig,
    run: tracking.RunContext | None = None,
    markdown_out: str | None = None,
    track: bool = True,
    headline: bool = True,
) -> EvaluateResult:
    """Evaluate a model; metrics, per-class scores and pictures go to MLflow.

    ``markdown_out``: also write the report with its pictures inlined (for the KFP UI).
    ``headline``: the scores also go to the pipeline's parent run (val_mDice, val_dice_CLASS, ...);
    off for the candidates of a pipeline that chooses among several models.
    """
    with (
        tracking.stage_log("evaluate", cfg, run, cfg.subset, enabled=track) as log,
        storage.staged_output(
            cfg.out, cfg.overwrite, inputs={"--model": cfg.model, "--data": cfg.data, "--baseline": cfg.baseline}
        ) as out,
        storage.local_input(cfg.model, "--model") as model_dir,
        storage.local_input(cfg.data, "--data") as data_dir,
        _optional_input(cfg.baseline, "--baseline") as baseline_dir,
    ):
        metrics = run_evaluation(cfg, model_dir, data_dir, out, baseline_dir)
        if markdown_out:
            _write(markdown_out, render_markdown(metrics, (out / "predictions.png").exists(), embed_dir=out))
        log.tag(tracking.FINGERPRINT_TAG, metrics["dataset_fingerprint"])
        log.result(metrics, "metrics.json", folder=out)
        log.headline(
            run if headline else None,
            headline_scores(metrics, cfg.subset),
            (dataset_ref(data_dir, cfg.data, "validation" if cfg.subset == "val" else cfg.subset),),
        )
    return EvaluateResult.of(metrics)


def export_stage(cfg: ExportConfig, run: tracking.RunContext | None = None, track: bool = True) -> ExportResult:
    """OpenVINO export with its parity check; the IR is logged to MLflow as a pyfunc model."""
    with (
        tracking.stage_log("export", cfg, run, cfg.precision, enabled=track) as log,
        storage.staged_output(
            cfg.out, cfg.overwrite, inputs={"--model": cfg.model, "--calibration": cfg.calibration}
        ) as out,
        storage.local_input(cfg.model, "--model") as model_dir,
        _optional_input(cfg.calibration, "--calibration") as data_dir,
    ):
        report = export(cfg, model_dir, data_dir, out)
        log.result(report, "export_report.json")
        report["model_uri"], report["model_id"] = log.model(out)
        scores = {"export_latency_ms": report["latency_ms"]}
        if "throughput_vs_fp32" in report:
            scores["export_throughput_vs_fp32"] = report["throughput_vs_fp32"]
        if cfg.precision == "int8" and "mDice_drop_points" in report:
            scores["int8_drop"] = report["mDice_drop_points"]
        log.headline(run, scores, model_id=report["model_id"])
    return ExportResult.of(report)


def convert_stage(
    checkpoint: str,
    out: str,
    labels: list[str],
    architecture: str = "",
    backbone_only: bool = False,
    input_size: int = 512,
    overwrite: bool = False,
) -> ConvertResult:
    """An OTX / mmseg Lite-HRNet checkpoint (a local file) as a segflow model or backbone artifact."""
    from segflow.models.otx import convert_checkpoint

    with storage.staged_output(out, overwrite, inputs={"CHECKPOINT": checkpoint}) as folder:
        return ConvertResult.of(convert_checkpoint(checkpoint, folder, labels, architecture, backbone_only, input_size))


def predict_stage(cfg: PredictConfig) -> PredictResult:
    """Masks, overlays and entropy maps for a folder (or file) of images."""
    with (
        storage.staged_output(cfg.out, cfg.overwrite, inputs={"--model": cfg.model, "--input": cfg.input}) as out,
        storage.local_input(cfg.model, "--model") as model_dir,
    ):
        return PredictResult.of(predict(cfg, model_dir, input_files(cfg.input), out))  # S3 images: one at a time


def _write(path: str, text: str) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(text)


def register_stage(
    name: str,
    model: str,
    evaluation: str,
    dataset: str,
    model_id: str,
    margin: float = 0.0,
    metric: str = "val_mDice",
    run: tracking.RunContext | None = None,
    artifact_uri: str = "",
    source_fingerprint: str = "",
    training_data: str = "",
    adapted_to: str = "",
) -> RegisterResult:
    """Register an exported model (logged model ``model_id``) as a version of ``name``; it becomes
    @challenger, and @champion when it beats the champion by more than ``margin`` on the same
    validation data (the champion is re-scored on ``dataset`` when it was scored on other data).
    The comparison goes to the pipeline's parent run as a table and a chart. What a retraining tick
    later reads (segflow.lifecycle) is tagged on the version: ``source_fingerprint`` (the raw data
    it was trained on), ``training_data`` (the dataset artifact, which an adaptation starts from)
    and ``adapted_to`` (the fingerprint of the unlabelled images it was adapted to)."""
    from segflow import registry

    if not model_id:
        raise SegflowError("registering needs the exported model logged to MLflow; run the export with tracking on.")
    with (
        tracking.stage_log("register", {"name": name, "margin": margin, "metric": metric}, run, name) as log,
        contextlib.ExitStack() as inputs,
        storage.local_input(evaluation, "evaluation") as evaluation_dir,
        storage.local_input(dataset, "--data") as data_dir,
    ):
        scores = json.loads((evaluation_dir / "metrics.json").read_text())
        subset = scores.get("subset", "val")

        def rescore(artifact: str) -> dict:
            with tempfile.TemporaryDirectory() as tmp:
                cfg = EvalConfig(model=artifact, data=str(data_dir), out=str(Path(tmp) / "eval"), subset=subset)
                return headline_scores(evaluate_stage(cfg, track=False).record, subset)

        parent = ""
        if run is not None and run.run_key:
            parent = tracking.pipeline_parent(run.run_key, run.run_name, run.experiment or None)
        candidate = registry.Candidate(
            model_id=model_id,
            model_artifact=artifact_uri or str(model),  # where a later run finds it (s3:// on a cluster)
            scores=headline_scores(scores, subset),
            validation_fingerprint=scores["dataset_fingerprint"],
            training_fingerprint=_training_fingerprint(model),
            run_id=parent,
            extra_tags={
                key: value
                for key, value in {
                    tracking.PIPELINE_RUN_TAG: run.run_key if run is not None else "",
                    registry.SOURCE_FINGERPRINT: source_fingerprint,
                    registry.TRAINING_DATA: training_data,
                    registry.ADAPTED_TO: adapted_to,
                }.items()
                if value
            },
        )
        # The drift signal's reference: how this model sees its validation images (and, where those
        # are few, its training images too: a handful of images gives noisy colour statistics).
        seen = image_files(data_dir / subset / "images")
        if len(seen) < drift.MIN_REFERENCE_IMAGES and (data_dir / "train" / "images").is_dir():
            seen += image_files(data_dir / "train" / "images")
        reference = drift.statistics(model_dir_for(model, inputs), seen)
        candidate.extra_tags[registry.DRIFT_REFERENCE] = json.dumps(reference)
        client = tracking.client()
        metric = metric.replace("val_", f"{subset}_")
        decision = registry.register(client, name, candidate, metric=metric, margin=margin, rescore=rescore)
        labels, table = registry.comparison(client, name)
        markdown = f"# {name}: v{decision['version']} is {decision['decision']}\n\n{decision['reason']}\n\n"
        markdown += comparison.versions_table(labels, table)
        with tempfile.TemporaryDirectory() as tmp:
            chart = comparison.versions_chart(labels, table, Path(tmp) / "registry.png", f"{name}: registered versions")
            log.to_parent(run, markdown, chart, [decision], folder="registry")
        log.tag("segflow.registered_model", f"{name}/{decision['version']}")
        result = decision | {"metrics": {"registered_version": decision["version"]}}
        log.result(result, "registration.json")
    return RegisterResult.of(result)


def model_dir_for(model: str, inputs: contextlib.ExitStack) -> Path:
    return inputs.enter_context(storage.local_input(model, "--model"))


def _training_fingerprint(model: str) -> str:
    with storage.local_input(model, "--model") as model_dir:
        return json.loads((model_dir / "config.json").read_text()).get("dataset_fingerprint", "")


def _champion(client, name: str) -> lifecycle.Champion | None:
    from segflow import registry

    version = registry.champion(client, name) if name else None
    if version is None:
        return None
    return lifecycle.Champion(
        version=int(version.version),
        source_fingerprint=version.tags.get(registry.SOURCE_FINGERPRINT, ""),
        model=version.tags.get(registry.MODEL_ARTIFACT, ""),
        data=version.tags.get(registry.TRAINING_DATA, ""),
        drift_reference=version.tags.get(registry.DRIFT_REFERENCE, ""),
    )


def _adapted_to(client, name: str, fingerprint: str) -> int | None:
    """The @champion or @challenger version already adapted to the images ``fingerprint``, or None."""
    from segflow import registry

    for alias in (registry.CHAMPION, registry.CHALLENGER):
        version = registry.champion(client, name, alias)
        if version is not None and version.tags.get(registry.ADAPTED_TO) == fingerprint:
            return int(version.version)
    return None


def check_data_stage(
    data_uri: str, registered_model: str, run: tracking.RunContext | None = None, threshold: float | None = None
) -> CheckDataResult:
    """Is ``data_uri`` new? Its fingerprint against the one the champion was trained on; for new,
    unlabelled images, the label-free drift score against the champion's validation images
    (segflow.evaluate.drift). ``segflow.lifecycle`` decides; this opens the inputs and logs: the
    score and its chart to MLflow, the decision's note on the parent run."""

    threshold = drift.DEFAULT_THRESHOLD if threshold is None else threshold
    fingerprint = storage.source_fingerprint(data_uri)
    client = tracking.client() if registered_model else None
    champion = _champion(client, registered_model) if registered_model else None
    other_data = champion is not None and champion.source_fingerprint != fingerprint
    adapted = _adapted_to(client, registered_model, fingerprint) if other_data else None
    decision = lifecycle.first_look(fingerprint, champion, adapted)
    result = {
        "fingerprint": fingerprint,
        "decision": decision.value,
        "champion_version": champion.version if champion is not None else 0,
        "champion_model": champion.model if champion is not None else "",
        "champion_data": champion.data if champion is not None else "",
    }
    config = {"data_uri": data_uri, "registered_model": registered_model, "drift_threshold": threshold}
    with (
        tracking.stage_log("check_data", config, run) as log,
        tempfile.TemporaryDirectory() as tmp,
        contextlib.ExitStack() as inputs,
    ):
        files, scores = [], {"new_data": 0 if decision is lifecycle.Decision.SAME else 1}
        if champion is not None and lifecycle.needs_drift(decision, champion):
            data = inputs.enter_context(storage.local_input(data_uri, "data_uri", sealed=False))
            labelled = (data / "masks").is_dir() or any(data.glob("*/masks"))
            images = data / "images" if (data / "images").is_dir() else data
            reference = json.loads(champion.drift_reference)
            now = drift.statistics(model_dir_for(champion.model, inputs), images)
            score, parts = drift.drift_score(reference, now)
            result |= {"drift_score": score, "drift_parts": parts, "drift_statistics": now, "labelled": labelled}
            scores |= {"drift_score": score, **{f"drift_{k}": v for k, v in parts.items()}}
            files.append(drift.drift_chart(reference, now, score, Path(tmp) / "drift.png"))
            decision = lifecycle.after_drift(champion, labelled, score, threshold)
            result["decision"] = decision.value
        log.tag("segflow.source_fingerprint", fingerprint)
        result["note"] = lifecycle.note(
            decision, data_uri, fingerprint, champion, adapted, result.get("drift_score", 0.0), threshold
        )
        result["metrics"] = scores
        log.result(result, "check.json", files=files)
        log.headline(run, scores)
        log.parent_tags(run, {"segflow.retrain": result["note"], "segflow.source_fingerprint": fingerprint})
        if files:
            log.parent_file(run, files[0], "drift")
    return CheckDataResult.of(result)
