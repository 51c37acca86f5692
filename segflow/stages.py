"""Each pipeline stage as one call: storage at the edges, the library's work, its MLflow run.

The CLI, the KFP components and the tests call these, so a stage behaves the same on a laptop
and in a cluster. A stage:

1. checks its settings;
2. opens its output (checked before any work, locked, published only when complete) and brings
   s3:// inputs to local folders (artifacts only when sealed; raw data and images as they are);
3. calls one library function on local paths;
4. returns one result dict. Its ``metrics`` (numbers) are the stage's headline figures: MLflow
   and the KFP Metrics artifact both log that dict, so they are chosen once, here.

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

from segflow import storage, tracking
from segflow.adapt.adaptation import adapt
from segflow.adapt.config import AdaptConfig
from segflow.data import manifest as manifest_lib
from segflow.data.importer import ImportConfig, import_dataset
from segflow.errors import SegflowError
from segflow.evaluate import comparison
from segflow.evaluate.evaluation import EvalConfig, render_markdown, run_evaluation
from segflow.export.openvino_ir import ExportConfig, export
from segflow.export.predict import PredictConfig, predict
from segflow.models import artifact as model_artifact
from segflow.selfsl.detcon import PretrainConfig, train_detcon
from segflow.selfsl.pseudo_masks import FelzenszwalbParams, default_mask_dir, make_pseudo_masks
from segflow.train.config import TrainConfig
from segflow.train.engine import Dist, is_main_process
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
) -> dict:
    """Import and validate a dataset; log config, fingerprint, counts and the report to MLflow.

    ``markdown_out``: also write the report there as one self-contained Markdown file (plot
    inlined), which is what the KFP UI can show.
    """
    cfg.validate()
    label = str(cfg.source).rstrip("/").rsplit("/", 1)[-1]
    with (
        tracking.stage_log("import", cfg, run, label, enabled=track) as log,
        storage.staged_output(cfg.out, cfg.overwrite) as out,
        storage.local_input(cfg.source, "dataset", sealed=False) as src,  # raw data: no marker needed
    ):
        report = import_dataset(cfg, src, out)
        log.tag(tracking.FINGERPRINT_TAG, report["fingerprint"])
        log.result(report, "report.json", files=[out / "report.md", out / "class_distribution.png"])
        if markdown_out:
            plot = out / "class_distribution.png"
            _write(markdown_out, manifest_lib.render_markdown(report, plot, embed_plot=True))
    return report


def train_stage(cfg: TrainConfig, run: tracking.RunContext | None = None, track: bool = True) -> dict:
    """Train a model; per-epoch metrics, the summary and the model's config go to MLflow."""
    cfg.validate()
    main = is_main_process()
    unlabeled = cfg.mean_teacher.unlabeled if cfg.mean_teacher else ""
    with (
        tracking.stage_log("train", cfg, run, f"{cfg.model} {cfg.method}", enabled=track and main) as log,
        storage.staged_output(cfg.out, cfg.overwrite, publish=main) as out,
        storage.local_input(cfg.data, "--data") as data,
        _optional_input(unlabeled, "--unlabeled", sealed=False) as unlabeled_dir,
        _optional_input(cfg.init_backbone, "--init-backbone") as backbone,
    ):
        checkpoints = _checkpoints(cfg.out, cfg.checkpoint_dir, cfg.resume, main)
        each_epoch = _pushing(checkpoints, log.epoch)
        result = train_segmenter(cfg, data, out, checkpoints.local, unlabeled_dir, backbone, on_epoch=each_epoch)
        log.tag(tracking.FINGERPRINT_TAG, result["dataset_fingerprint"])
        log.result(result, "training.json")
    if main:
        checkpoints.discard()
    return result


def _checkpoints(out: str, explicit: str, resume: bool, main: bool) -> storage.Checkpoints:
    """A training stage's checkpoints; with --resume, pulled from an s3:// checkpoint prefix
    first when this machine has none (a retried task in a fresh pod). One process pulls, the
    others (torchrun, same pod) wait for it."""
    checkpoints = storage.Checkpoints(out, explicit)
    if resume and main:
        checkpoints.pull()
    Dist().barrier()
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
) -> dict:
    """Felzenszwalb pseudo masks of a folder of images.

    Local images, local masks: the mask folder is a cache, updated in place (a mask is reused when
    its image and parameters match). With s3:// on either side, the masks are made into a new
    output, published whole like any artifact.
    """
    params = params or FelzenszwalbParams()
    config = {"images": images, "out": out, **params.__dict__}
    with tracking.stage_log("pseudo_masks", config, run, enabled=track) as log:
        if not storage.is_s3(images) and not storage.is_s3(out):
            result = make_pseudo_masks(Path(images), Path(out) if out else None, params, workers)
        else:
            if not out:
                raise SegflowError("pseudo masks of s3:// images need --out (a local folder or s3:// prefix).")
            with (
                storage.staged_output(out, overwrite) as stage,
                storage.local_input(images, "IMAGES", sealed=False) as folder,
            ):
                result = make_pseudo_masks(folder, stage, params, workers) | {"out": out}
        result["metrics"] = {k: result[k] for k in ("images", "made", "reused")}
        log.result(result)
    return result


def detcon_masks_dir(cfg: PretrainConfig, images: Path) -> Path:
    return Path(cfg.masks) if cfg.masks else default_mask_dir(images)


def detcon_masks(cfg: PretrainConfig, images: Path) -> tuple[Path, dict]:
    """The pseudo masks DetCon trains on: ``--masks`` or detcon_mask/ beside the images, made when missing."""
    masks = detcon_masks_dir(cfg, images)
    return masks, make_pseudo_masks(images, masks, cfg.felzenszwalb)


def detcon_stage(cfg: PretrainConfig, run: tracking.RunContext | None = None, track: bool = True) -> dict:
    """DetCon pretraining (pseudo masks first, when missing); per-epoch loss to MLflow."""
    cfg.validate()
    main = is_main_process()
    with (
        tracking.stage_log("pretrain", cfg, run, f"{cfg.model} detcon", enabled=track and main) as log,
        storage.staged_output(cfg.out, cfg.overwrite, publish=main) as out,
        storage.local_input(cfg.images, "--images", sealed=False) as images,
    ):
        # One process makes the masks and the others (torchrun) wait for them, unless every process
        # has its own download of s3:// images, beside which each makes its own.
        dist = Dist()
        own_copy = storage.is_s3(cfg.images)
        masks, made = detcon_masks(cfg, images) if main or own_copy else (detcon_masks_dir(cfg, images), {})
        dist.barrier()
        checkpoints = _checkpoints(cfg.out, cfg.checkpoint_dir, cfg.resume, main)
        result = train_detcon(cfg, images, masks, out, checkpoints.local, on_epoch=_pushing(checkpoints, log.epoch))
        result["pseudo_masks"] = made
        log.result(result, "pretraining.json")
    if main:
        checkpoints.discard()
    return result


def adapt_stage(
    cfg: AdaptConfig,
    run: tracking.RunContext | None = None,
    track: bool = True,
    on_epoch: Callable[[int, dict], None] | None = None,
) -> dict:
    """Domain adaptation from a source-trained model; curves (segmentation and adversarial losses,
    discriminator accuracy, target entropy, target mIoU when known) go to MLflow."""
    cfg.validate()
    main = is_main_process()
    with (
        tracking.stage_log("adapt", cfg, run, cfg.method, enabled=track and main) as log,
        storage.staged_output(cfg.out, cfg.overwrite, publish=main) as out,
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
    if main:
        checkpoints.discard()
    return result


def ensemble_stage(models: list[str], out: str, overwrite: bool = False, run=None, track: bool = True) -> dict:
    """One model that averages the members' softmax (e.g. MinEnt + AdvEnt)."""
    with (
        tracking.stage_log("ensemble", {"models": models, "out": out}, run, enabled=track) as log,
        storage.staged_output(out, overwrite) as folder,
        contextlib.ExitStack() as inputs,
    ):
        local = [inputs.enter_context(storage.local_input(m, "--models")) for m in models]
        config = model_artifact.save_ensemble(folder, local)
        result = {"members": models, "labels": config["labels"], "metrics": {"members": len(models)}}
        log.result(result, "ensemble.json")
    return result


def choose_stage(
    candidates: dict[str, tuple[str, str]],
    out: str,
    metric: str = "mDice",
    markdown_out: str | None = None,
    run: tracking.RunContext | None = None,
    track: bool = True,
) -> dict:
    """The best of several models by an evaluation ``metric``: ``candidates`` maps a name to
    (model folder, its evaluation folder). The best model is copied to ``out``; the comparison
    (table and bar chart) goes to the pipeline's parent MLflow run, where all runs compare."""
    with (
        tracking.stage_log("choose", {"metric": metric, "candidates": sorted(candidates)}, run, enabled=track) as log,
        storage.staged_output(out, overwrite=True) as folder,
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
        result = {"best": best["candidate"], "candidates": rows, "metric": metric}
        # MLflow metric names take no "+": "minent+advent" is logged as mDice_minent_advent.
        per_candidate = {re.sub(r"[^\w.\- ]", "_", f"{metric}_{r['candidate']}"): r[metric] for r in rows}
        result["metrics"] = per_candidate | {f"best_{metric}": best[metric]}
        log.result(result, "comparison.json")
    return result


def _inline_png(path: Path) -> str:
    import base64

    return f"![comparison](data:image/png;base64,{base64.b64encode(path.read_bytes()).decode()})\n"


def evaluate_stage(
    cfg: EvalConfig, run: tracking.RunContext | None = None, markdown_out: str | None = None, track: bool = True
) -> dict:
    """Evaluate a model; metrics, per-class scores and pictures go to MLflow.

    ``markdown_out``: also write the report with its pictures inlined (for the KFP UI).
    """
    with (
        tracking.stage_log("evaluate", cfg, run, cfg.subset, enabled=track) as log,
        storage.staged_output(cfg.out, cfg.overwrite) as out,
        storage.local_input(cfg.model, "--model") as model_dir,
        storage.local_input(cfg.data, "--data") as data_dir,
        _optional_input(cfg.baseline, "--baseline") as baseline_dir,
    ):
        metrics = run_evaluation(cfg, model_dir, data_dir, out, baseline_dir)
        if markdown_out:
            _write(markdown_out, render_markdown(metrics, (out / "predictions.png").exists(), embed_dir=out))
        log.tag(tracking.FINGERPRINT_TAG, metrics["dataset_fingerprint"])
        log.result(metrics, "metrics.json", folder=out)
    return metrics


def export_stage(cfg: ExportConfig, run: tracking.RunContext | None = None, track: bool = True) -> dict:
    """OpenVINO export with its parity check; the IR is logged to MLflow as a pyfunc model."""
    with (
        tracking.stage_log("export", cfg, run, cfg.precision, enabled=track) as log,
        storage.staged_output(cfg.out, cfg.overwrite) as out,
        storage.local_input(cfg.model, "--model") as model_dir,
        _optional_input(cfg.calibration, "--calibration") as data_dir,
    ):
        report = export(cfg, model_dir, data_dir, out)
        log.result(report, "export_report.json")
        report["model_uri"] = log.model(out)
    return report


def convert_stage(
    checkpoint: str,
    out: str,
    labels: list[str],
    architecture: str = "",
    backbone_only: bool = False,
    input_size: int = 512,
    overwrite: bool = False,
) -> dict:
    """An OTX / mmseg Lite-HRNet checkpoint (a local file) as a segflow model or backbone artifact."""
    from segflow.models.otx import convert_checkpoint

    with storage.staged_output(out, overwrite) as folder:
        return convert_checkpoint(checkpoint, folder, labels, architecture, backbone_only, input_size)


def predict_stage(cfg: PredictConfig) -> dict:
    """Masks, overlays and entropy maps for a folder (or file) of images."""
    with (
        storage.staged_output(cfg.out, cfg.overwrite) as out,
        storage.local_input(cfg.model, "--model") as model_dir,
        storage.local_input(cfg.input, "--input", sealed=False) as source,  # the user's images
    ):
        return predict(cfg, model_dir, source, out)


def _write(path: str, text: str) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(text)
