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
from collections.abc import Iterator
from pathlib import Path

from segflow import storage, tracking
from segflow.data import manifest as manifest_lib
from segflow.data.importer import ImportConfig, import_dataset
from segflow.errors import SegflowError
from segflow.evaluate.evaluation import EvalConfig, render_markdown, run_evaluation
from segflow.export.openvino_ir import ExportConfig, export
from segflow.export.predict import PredictConfig, predict
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
        checkpoints = storage.checkpoint_dir(cfg.out, cfg.checkpoint_dir)
        result = train_segmenter(cfg, data, out, checkpoints, unlabeled_dir, backbone, on_epoch=log.epoch)
        log.tag(tracking.FINGERPRINT_TAG, result["dataset_fingerprint"])
        log.result(result, "training.json")
    return result


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
        checkpoints = storage.checkpoint_dir(cfg.out)
        result = train_detcon(cfg, images, masks, out, checkpoints, on_epoch=log.epoch)
        result["pseudo_masks"] = made
        log.result(result, "pretraining.json")
    return result


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
    ):
        metrics = run_evaluation(cfg, model_dir, data_dir, out)
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
