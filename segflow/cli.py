"""``segflow``: one subcommand per stage (the pipeline commands run / compile / submit / schedule /
params are added by ``segflow_kfp.cli``, the KFP layer).

User errors (``SegflowError``) print one clear message and exit with code 2, no traceback.
"""

from __future__ import annotations

import logging
import math
import signal
import sys
from pathlib import Path
from typing import Annotated

import typer

from segflow.configs import from_options
from segflow.data import MAX_IMAGE_PIXELS
from segflow.errors import SegflowError
from segflow.redact import redact_logging

app = typer.Typer(
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    help="Label-efficient, domain-adaptive semantic segmentation pipelines.",
)
data_app = typer.Typer(no_args_is_help=True, help="Make, import and validate datasets.")
app.add_typer(data_app, name="data")


@data_app.command("synth")
def data_synth(
    out: Annotated[Path, typer.Argument(help="Folder to create.")],
    domain: Annotated[str, typer.Option(help="source (game-engine look) or target (camera look).")] = "source",
    num_images: Annotated[int, typer.Option(help="How many scenes.")] = 100,
    size: Annotated[int, typer.Option(help="Image side in pixels.")] = 128,
    seed: Annotated[int, typer.Option(help="Same seed, same bytes.")] = 0,
    unlabeled: Annotated[bool, typer.Option("--unlabeled", help="Images only, no masks or meta.")] = False,
    family: Annotated[str, typer.Option(help="street (7 classes) or indoor (8 classes: rooms, furniture).")] = "street",
) -> None:
    """Render procedural scenes (street or indoor) in Common Semantic Segmentation layout."""
    from segflow.data.synth import synthesize

    path = synthesize(out, domain, num_images, size, seed, unlabeled, family)  # type: ignore[arg-type]
    typer.echo(f"wrote {num_images} {family} {domain} {'images' if unlabeled else 'labelled scenes'} to {path}")


@data_app.command("preview")
def data_preview(
    out: Annotated[Path, typer.Argument(help="PNG file to write.")],
    size: Annotated[int, typer.Option(help="Image side in pixels.")] = 128,
    seed: Annotated[int, typer.Option()] = 0,
    family: Annotated[str, typer.Option(help="street or indoor.")] = "street",
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace OUT.png if it exists.")] = False,
) -> None:
    """Save a grid of source and target samples with their masks."""
    from segflow.data.synth import preview_grid

    typer.echo(f"wrote {preview_grid(out, size=size, seed=seed, family_name=family, overwrite=overwrite)}")


@data_app.command("import")
def data_import(
    paths: Annotated[
        list[str],
        typer.Argument(
            metavar="SRC OUT",
            help="SRC: the dataset folder; OUT: the artifact folder to create (local paths or s3://bucket/prefix). "
            "With --images, only OUT.",
        ),
    ],
    data_format: Annotated[str | None, typer.Option("--format", help="Datumaro format; detected when omitted.")] = None,
    images: Annotated[str, typer.Option(help="Plain paired folders: the image folder (with --masks, --labels).")] = "",
    masks: Annotated[str, typer.Option(help="Plain paired folders: masks named like the images.")] = "",
    labels: Annotated[str, typer.Option(help="Class names by id: a,b,c, a file of one per line, or a meta JSON.")] = "",
    mask_suffix: Annotated[str, typer.Option(help="What mask names add to the image's, e.g. _mask.")] = "",
    colors: Annotated[str, typer.Option(help="Colour masks: a JSON file of [R, G, B] per label id.")] = "",
    subset_list: Annotated[
        list[str] | None,
        typer.Option(help="Paired folders: train.txt, val.txt ... naming each subset's images (repeatable)."),
    ] = None,
    lossy_masks: Annotated[
        int,
        typer.Option(help="Accept JPEG masks: snap each value (or colour channel) to a label within this distance."),
    ] = -1,
    option: Annotated[
        list[str] | None,
        typer.Option("--option", help="KEY=VALUE for the format's reader (repeatable), e.g. mask_prefix=gt_."),
    ] = None,
    val_fraction: Annotated[float, typer.Option(help="Share of images split off as val when SRC has no val.")] = 0.2,
    seed: Annotated[int, typer.Option(help="Seed of the train/val split.")] = 0,
    workers: Annotated[int, typer.Option(help="Worker processes; 0 = one per core.")] = 0,
    ignore_labels: Annotated[
        str, typer.Option(help="Comma-separated classes read as 'ignore' (255), e.g. void,unlabelled.")
    ] = "",
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace OUT if it exists.")] = False,
    track: Annotated[bool, typer.Option("--track/--no-track", help="Log an MLflow run.")] = True,
) -> None:
    """Import SRC, validate every item, write a normalised dataset artifact to OUT.

    Label ids are read as the dataset declares them (any order, gaps allowed); the artifact's
    masks hold contiguous training ids, and its manifest maps them back to the dataset's ids.
    """
    options = dict(locals())  # the command's options, before any other name
    from segflow.data.importer import ImportConfig
    from segflow.stages import import_stage

    if len(paths) != (1 if images else 2):
        raise SegflowError(
            "give SRC OUT (a dataset folder, the artifact to create), or --images DIR --masks DIR --labels a,b,c OUT."
        )
    src, out = (images, paths[0]) if images else (paths[0], paths[1])
    ignored = tuple(n.strip() for n in ignore_labels.split(",") if n.strip())
    cfg = from_options(
        ImportConfig,
        options,
        used=("paths", "images", "data_format", "option", "subset_list", "track"),
        source=src,
        out=out,
        format=data_format,
        ignore_labels=ignored,
        reader_options=tuple(option or ()),
        subset_lists=tuple(subset_list or ()),
    )
    report = import_stage(cfg, track=track)
    counts = ", ".join(f"{k} {v}" for k, v in report.counts.items())
    typer.echo(f"imported {counts} images, {len(report.labels)} labels -> {out}")
    typer.echo(f"fingerprint {report.fingerprint}")
    typer.echo(f"report: {out}/report.md ({len(report.warnings)} warning(s))")


@app.command("train")
def train_cmd(
    data: Annotated[str, typer.Option(help="Dataset artifact (from `segflow data import`): path or s3://.")],
    out: Annotated[str, typer.Option(help="Model folder to create: path or s3://.")],
    model: Annotated[str, typer.Option(help="lite_hrnet_s, lite_hrnet_18 or lite_hrnet_x.")] = "lite_hrnet_s",
    method: Annotated[str, typer.Option(help="supervised, supcon, or mean_teacher (with --unlabeled).")] = "supervised",
    unlabeled: Annotated[str, typer.Option(help="Folder of unlabelled images for --method mean_teacher.")] = "",
    epochs: Annotated[int, typer.Option()] = 30,
    batch_size: Annotated[int, typer.Option()] = 8,
    input_size: Annotated[int, typer.Option(help="Training crop side in pixels (multiple of 32).")] = 256,
    seed: Annotated[int, typer.Option()] = 0,
    lr: Annotated[float, typer.Option(help="Adam learning rate.")] = 1e-3,
    iters_per_epoch: Annotated[int, typer.Option(help="At least this many steps per epoch (small data).")] = 0,
    tile: Annotated[
        str,
        typer.Option(
            help="Large images: train and predict on tiles of SIZE px at native resolution (replaces "
            "--input-size), or auto (from object sizes); 0: whole images."
        ),
    ] = "0",
    tile_overlap: Annotated[float, typer.Option(help="Share of a tile shared with its neighbour (0-0.75).")] = 0.25,
    tile_scale: Annotated[float, typer.Option(help="Resize images by this factor before tiling.")] = 1.0,
    max_labeled: Annotated[int, typer.Option(help="Use only the first N labelled images; 0 = all.")] = 0,
    early_stop_patience: Annotated[int, typer.Option()] = 8,
    resume: Annotated[bool, typer.Option("--resume", help="Continue from the last checkpoint.")] = False,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Start over; replace OUT.")] = False,
    init_backbone: Annotated[str, typer.Option(help="Backbone weights from `segflow pretrain`.")] = "",
    init_model: Annotated[str, typer.Option(help="A model folder to fine-tune (same classes and --model).")] = "",
    amp: Annotated[str, typer.Option(help="auto, off, bf16 or fp16.")] = "auto",
    loader_workers: Annotated[
        int, typer.Option(help="Batch-reading processes; -1: none on CPU, up to 4 beside a GPU.")
    ] = -1,
    track: Annotated[bool, typer.Option("--track/--no-track", help="Log an MLflow run.")] = True,
) -> None:
    """Train a segmentation model (the OTX recipe); publish the best epoch's weights to OUT.

    Several processes: `torchrun --nproc-per-node N -m segflow.cli train ...` (DDP).
    """
    options = dict(locals())  # the command's options, before any other name
    from segflow.stages import train_stage
    from segflow.train.config import TrainConfig, method_settings

    options["tile"] = tile_option(tile)
    result = train_stage(
        from_options(TrainConfig, options, ("method", "unlabeled", "track"), **method_settings(method, unlabeled)),
        track=track,
    )
    typer.echo(
        f"best val mDice {result.best_val_mDice:.4f} at epoch {result.best_epoch} ({result.epochs_run} epochs) -> {out}"
    )


def tile_option(value: str) -> int:
    """--tile: a tile side in pixels, ``auto`` (stored as -1) or 0 (off)."""
    if value.strip().lower() == "auto":
        return -1
    try:
        return int(value)
    except ValueError:
        raise SegflowError(f"--tile must be a tile side in pixels, auto, or 0 (got {value!r}).") from None


def auto_number(value: str, setting: str, kind: type = float) -> float:
    """An option that takes a number or ``auto`` (stored as 0: the stage chooses from the data)."""
    if value.strip().lower() == "auto":
        return kind(0)
    try:
        number = kind(value)
    except ValueError:
        raise SegflowError(f"{setting} must be a number or 'auto' (got {value!r}).") from None
    if not math.isfinite(number) or number <= 0:
        raise SegflowError(f"{setting} must be a finite positive number, or 'auto' (got {value!r}).")
    return number


AUTO_RULE = "auto: chosen from the image size (docs/methods.md)."
Scale = Annotated[str, typer.Option(help=f"Felzenszwalb scale, or {AUTO_RULE}")]
MinSize = Annotated[str, typer.Option(help=f"Felzenszwalb minimum region size in pixels, or {AUTO_RULE}")]
Sigma = Annotated[float, typer.Option(help="Felzenszwalb Gaussian sigma.")]


def felzenszwalb_options(scale: str, sigma: float, min_size: str):
    from segflow.selfsl.pseudo_masks import FelzenszwalbParams

    return FelzenszwalbParams(
        scale=auto_number(scale, "--scale"), sigma=sigma, min_size=int(auto_number(min_size, "--min-size", int))
    )


@app.command("pseudo-masks")
def pseudo_masks_cmd(
    images: Annotated[str, typer.Argument(help="Folder of images (local or s3://).")],
    out: Annotated[str, typer.Option(help="Mask folder; default: detcon_mask/ beside IMAGES.")] = "",
    workers: Annotated[int, typer.Option(help="Processes; 0 = one per core.")] = 0,
    scale: Scale = "auto",
    sigma: Sigma = 0.8,
    min_size: MinSize = "auto",
    overwrite: Annotated[
        bool, typer.Option("--overwrite", help="Replace masks made with other parameters (or an s3:// OUT).")
    ] = False,
    track: Annotated[bool, typer.Option("--track/--no-track", help="Log an MLflow run.")] = False,
) -> None:
    """Felzenszwalb pseudo masks for DetCon; masks already made for the same image and parameters are reused.

    Masks made with other parameters are kept unless --overwrite says to replace them.
    """
    from segflow.stages import pseudo_masks_stage

    params = felzenszwalb_options(scale, sigma, min_size)
    result = pseudo_masks_stage(images, out, params, workers, track=track, overwrite=overwrite)
    typer.echo(
        f"{result.images} images: {result.made} masks made, {result.reused} reused, "
        f"{result.segments_per_image:g} segments per image ({_felzenszwalb_said(result.record)}) -> {result.out}"
    )


def _felzenszwalb_said(made: dict) -> str:
    p = made["params"]
    return f"scale {p['scale']:g}, sigma {p['sigma']:g}, min size {p['min_size']}: {made['params_chosen_by']}"


@app.command("pretrain")
def pretrain_cmd(
    images: Annotated[str, typer.Option(help="Folder of unlabelled images (local or s3://).")],
    out: Annotated[str, typer.Option(help="Folder to create for the backbone weights.")],
    model: Annotated[str, typer.Option(help="lite_hrnet_s, lite_hrnet_18 or lite_hrnet_x.")] = "lite_hrnet_s",
    epochs: Annotated[int, typer.Option()] = 10,
    batch_size: Annotated[int, typer.Option()] = 16,
    input_size: Annotated[str, typer.Option(help=f"View side in pixels (multiple of 32), or {AUTO_RULE}")] = "auto",
    lr: Annotated[str, typer.Option(help="SGD learning rate, or auto: chosen from the step budget.")] = "auto",
    iters_per_epoch: Annotated[
        int, typer.Option(help="At least this many steps per epoch; 0: auto (one pass, at least 50 steps).")
    ] = 0,
    masks: Annotated[
        str, typer.Option(help="Pseudo-mask folder (pseudo-masks --out); default: detcon_mask/ beside IMAGES.")
    ] = "",
    scale: Scale = "auto",
    sigma: Sigma = 0.8,
    min_size: MinSize = "auto",
    seed: Annotated[int, typer.Option()] = 0,
    resume: Annotated[bool, typer.Option("--resume")] = False,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Start over; replace OUT (never the masks).")] = False,
    track: Annotated[bool, typer.Option("--track/--no-track", help="Log an MLflow run.")] = True,
) -> None:
    """DetCon self-supervised pretraining of a backbone.

    Pseudo masks already in --masks (or detcon_mask/ beside the images) are used as they are; the
    missing ones are made with their parameters, or by the size rule when there are none. Asking for
    other Felzenszwalb parameters than those masks have stops with an error: nothing is replaced.
    """
    options = dict(locals())  # the command's options, before any other name
    from segflow.selfsl.config import PretrainConfig
    from segflow.stages import pretrain_stage

    cfg = from_options(
        PretrainConfig,
        options,
        used=("scale", "sigma", "min_size", "track"),
        input_size=int(auto_number(input_size, "--input-size", int)),
        lr=auto_number(lr, "--lr"),
        felzenszwalb=felzenszwalb_options(scale, sigma, min_size),
    )
    result = pretrain_stage(cfg, track=track)
    metrics, chosen, made = result.metrics, result.chosen, result.pseudo_masks
    if made:
        typer.echo(
            f"pseudo masks: {made['made']} made, {made['reused']} reused, "
            f"{made['segments_per_image']:g} segments per image ({_felzenszwalb_said(made)})"
        )
    for name in ("input_size", "iters_per_epoch", "lr"):
        if name in chosen:
            typer.echo(f"auto {name} = {chosen[name]:g} ({chosen[name + '_rule']})")
    typer.echo(
        f"DetCon loss {metrics['first_loss']:.3f} -> {metrics['final_loss']:.3f} over {metrics['epochs']} epochs "
        f"on {metrics['images']} images -> {out}  (use: segflow train --init-backbone {out})"
    )


@app.command("adapt")
def adapt_cmd(
    source: Annotated[str, typer.Option(help="Labelled source dataset artifact: path or s3://.")],
    target: Annotated[str, typer.Option(help="Target images (a folder), or a target dataset artifact.")],
    init: Annotated[str, typer.Option(help="Model folder trained on the source (`segflow train`).")],
    out: Annotated[str, typer.Option(help="Model folder to create.")],
    method: Annotated[str, typer.Option(help="adaptsegnet, minent, advent, dacs, or source (the control).")],
    levels: Annotated[str, typer.Option(help="single: main output only; multi: also the auxiliary.")] = "multi",
    model: Annotated[str, typer.Option(help="Architecture; default: the --init model's.")] = "",
    iterations: Annotated[int, typer.Option(help="Adaptation steps (rounded up to whole snapshots).")] = 1000,
    eval_every: Annotated[int, typer.Option(help="Score a snapshot every this many steps.")] = 100,
    batch_size: Annotated[int, typer.Option()] = 8,
    input_size: Annotated[
        int, typer.Option(help="Crop side in pixels (multiple of 32); default: the --init model's.")
    ] = 0,
    lr: Annotated[float, typer.Option(help="Segmenter learning rate (Adam, poly decay).")] = 1e-4,
    adv_weight: Annotated[
        float | None, typer.Option(help="Adversarial loss weight; default: 0.01 AdaptSegNet, 0.1 AdvEnt.")
    ] = None,
    ent_weight: Annotated[float, typer.Option(help="MinEnt: target entropy weight.")] = 1.0,
    disc_pool: Annotated[
        int,
        typer.Option(help="AdaptSegNet, AdvEnt: discriminators read the maps average-pooled by this (1: full size)."),
    ] = 4,
    mix_weighting: Annotated[
        str, typer.Option(help="DACS: weight pseudo-labels per pixel by the teacher's confidence, or per image.")
    ] = "pixel",
    select: Annotated[
        str,
        typer.Option(
            help="What chooses the snapshot: auto (target val labels if any, else label-free), labels, "
            "label-free, or a criterion: consistency, agreement, confidence, source."
        ),
    ] = "auto",
    seed: Annotated[int, typer.Option()] = 0,
    resume: Annotated[bool, typer.Option("--resume", help="Continue from the last checkpoint.")] = False,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Start over; replace OUT.")] = False,
    track: Annotated[bool, typer.Option("--track/--no-track", help="Log an MLflow run.")] = True,
) -> None:
    """Adapt a source-trained model to a target domain (AdaptSegNet, MinEnt, AdvEnt, DACS).

    Target labels, when TARGET is a dataset, only choose the snapshot (target val mDice); without
    them the snapshot whose target predictions agree best with those of a rescaled, mirrored view
    is kept (every label-free measurement is recorded in training.json).
    """
    options = dict(locals())  # the command's options, before any other name
    from segflow.adapt.config import AdaptConfig
    from segflow.stages import adapt_stage

    result = adapt_stage(from_options(AdaptConfig, options), track=track)
    selection = result.selection
    typer.echo(
        f"{result.method}: snapshot after {result.metrics['best_iteration']} steps kept "
        f"({selection['criterion']}: {selection['score']:.4f}) -> {out}"
    )


@app.command("ensemble")
def ensemble_cmd(
    models: Annotated[list[str], typer.Option("--models", help="Model folders (repeat, or space-separated).")],
    out: Annotated[str, typer.Option(help="Model folder to create.")],
    overwrite: Annotated[bool, typer.Option("--overwrite")] = False,
    track: Annotated[bool, typer.Option("--track/--no-track", help="Log an MLflow run.")] = True,
) -> None:
    """Average the softmax of several models (ADVENT's MinEnt + AdvEnt combination); the result
    evaluates, exports and predicts like one model."""
    from segflow.stages import ensemble_stage

    result = ensemble_stage(models, out, overwrite, track=track)
    typer.echo(f"ensemble of {len(result.members)} models -> {out}")


@app.command("choose")
def choose_cmd(
    candidate: Annotated[
        list[str],
        typer.Option("--candidate", help="NAME=MODEL,EVALUATION: a model folder and its `segflow evaluate` folder."),
    ],
    out: Annotated[str, typer.Option(help="Model folder to create: a copy of the best candidate.")],
    metric: Annotated[str, typer.Option(help="mDice or mIoU, on the subset the evaluations scored.")] = "mDice",
    report: Annotated[str | None, typer.Option(help="Also write the comparison as Markdown here.")] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite")] = False,
    track: Annotated[bool, typer.Option("--track/--no-track", help="Log an MLflow run.")] = True,
) -> None:
    """The best of several evaluated models (as the adaptation pipeline picks among source-only, the
    methods and the ensemble): copied to OUT; the comparison table and chart go to MLflow."""
    from segflow.stages import choose_stage

    candidates: dict[str, tuple[str, str]] = {}
    for text in candidate:
        name, _, paths = text.partition("=")
        model, _, evaluation = paths.rpartition(",")
        if not (name and model and evaluation):
            raise SegflowError(f"--candidate {text!r}: write NAME=MODEL,EVALUATION (a model folder, its evaluation).")
        if name in candidates:
            raise SegflowError(f"--candidate names must differ: {name!r} is given twice.")
        candidates[name] = (model, evaluation)
    result = choose_stage(candidates, out, metric, markdown_out=report, track=track, overwrite=overwrite)
    for row in result.candidates:
        typer.echo(f"{row['candidate']:>16s}  {metric} {100 * row[metric]:.2f}")
    typer.echo(f"best: {result.best} -> {out}")


@app.command("register")
def register_cmd(
    name: Annotated[str, typer.Option(help="Registered model name in MLflow.")],
    model: Annotated[str, typer.Option(help="The model folder the IR was exported from.")],
    evaluation: Annotated[str, typer.Option(help="Its `segflow evaluate --out` folder.")],
    data: Annotated[str, typer.Option(help="The dataset artifact that evaluation scored.")],
    model_id: Annotated[str, typer.Option(help="The exported IR's MLflow model id (`segflow export` prints it).")],
    margin: Annotated[float, typer.Option(help="Promote when better than the champion by more (mDice, 0-1).")] = 0.0,
) -> None:
    """Register an exported model as a new version: @challenger, and @champion when it beats the
    champion on the same validation data (the champion is re-scored when it was scored elsewhere)."""
    from segflow.stages import register_stage

    result = register_stage(name, model, evaluation, data, model_id, margin)
    typer.echo(f"{name} v{result.version}: {result.decision} ({result.reason})")


@app.command("check-data")
def check_data_cmd(
    data: Annotated[str, typer.Argument(help="The data a tick found: a folder or s3:// prefix.")],
    registered_model: Annotated[str, typer.Option(help="Registered model whose champion it is compared with.")],
    threshold: Annotated[float | None, typer.Option(help="Drift score above which unlabelled images shifted.")] = None,
) -> None:
    """What a retraining tick would do with DATA: same, new, shifted, unlabelled or adapted
    (segflow.lifecycle), with the drift score of unlabelled images against the champion's."""
    from segflow.stages import check_data_stage

    result = check_data_stage(data, registered_model, threshold=threshold)
    typer.echo(f"{result.decision}: {result.note}")


@app.command("evaluate")
def evaluate_cmd(
    model: Annotated[str, typer.Option(help="Model folder (from `segflow train`).")],
    data: Annotated[str, typer.Option(help="Dataset artifact.")],
    out: Annotated[str, typer.Option(help="Folder to create for metrics and pictures.")],
    subset: Annotated[str, typer.Option()] = "val",
    baseline: Annotated[str, typer.Option(help="Another model scored beside (pictures with entropy maps).")] = "",
    overwrite: Annotated[bool, typer.Option("--overwrite")] = False,
    track: Annotated[bool, typer.Option("--track/--no-track", help="Log an MLflow run.")] = True,
) -> None:
    """Score a model: mDice, mIoU, per class, confusion matrix, prediction pictures."""
    options = dict(locals())  # the command's options, before any other name
    from segflow.evaluate.evaluation import EvalConfig
    from segflow.stages import evaluate_stage

    scores = evaluate_stage(from_options(EvalConfig, options), track=track)
    typer.echo(
        f"mDice {scores.mDice:.4f}  mIoU {scores.mIoU:.4f}  pixel accuracy "
        f"{scores.pixel_accuracy:.4f} on {scores.images} {subset} images -> {out}"
    )


@app.command("export")
def export_cmd(
    model: Annotated[str, typer.Option(help="Model folder (from `segflow train`).")],
    out: Annotated[str, typer.Option(help="IR folder to create.")],
    precision: Annotated[str, typer.Option(help="fp32, fp16 or int8.")] = "fp32",
    calibration: Annotated[str, typer.Option(help="Dataset artifact: INT8 calibration and parity images.")] = "",
    input_size: Annotated[int, typer.Option(help="Fixed input side; default: the training size.")] = 0,
    dynamic: Annotated[bool, typer.Option("--dynamic", help="Any batch and image size.")] = False,
    max_drop: Annotated[float, typer.Option(help="mDice points FP16/INT8 may lose.")] = 1.0,
    accuracy_control: Annotated[
        bool, typer.Option("--accuracy-control", help="INT8: keep the drop within --max-drop.")
    ] = False,
    int8_scheme: Annotated[
        str,
        typer.Option(
            help="INT8: auto (qat when within --max-drop, else convs-fp32-head), qat (quantisation-aware "
            "fine-tuning), or a post-training placement: convs-fp32-head, convs, dense-fp32-head, all."
        ),
    ] = "auto",
    qat_steps: Annotated[int, typer.Option(help="INT8 qat: fine-tuning steps on the calibration train images.")] = 300,
    qat_lr: Annotated[float, typer.Option(help="INT8 qat: learning rate (Adam).")] = 3e-4,
    overwrite: Annotated[bool, typer.Option("--overwrite")] = False,
    track: Annotated[bool, typer.Option("--track/--no-track", help="Log an MLflow run and pyfunc model.")] = True,
) -> None:
    """Export to OpenVINO IR, checked against the PyTorch model (fails on disagreement)."""
    options = dict(locals())  # the command's options, before any other name
    from segflow.export.openvino_ir import ExportConfig
    from segflow.stages import export_stage

    report = export_stage(from_options(ExportConfig, options), track=track)
    parity = ""
    if report.passed is not None:
        parity = (
            f", parity: max |logit diff| {report.max_abs_logit_diff:.2e}, mDice {100 * report.ir_mDice:.2f}"
            f" vs {100 * report.torch_mDice:.2f} in PyTorch"
        )
    typer.echo(f"{precision.upper()} IR -> {out} (latency {report.latency_ms:.1f} ms{parity})")
    if report.model_id:
        typer.echo(f"MLflow model id {report.model_id} (segflow register --model-id {report.model_id} ...)")


@app.command("predict")
def predict_cmd(
    model: Annotated[str, typer.Option(help="IR folder (from `segflow export`) or model folder.")],
    input: Annotated[str, typer.Option("--input", help="Image file or folder of images.")],
    out: Annotated[str, typer.Option(help="Folder to create: masks/, overlays/, entropy/.")],
    entropy: Annotated[bool, typer.Option("--entropy", help="Also write per-pixel entropy maps.")] = False,
    ids: Annotated[
        str, typer.Option(help="Mask values: train (class index) or dataset (the training data's own label ids).")
    ] = "train",
    max_image_pixels: Annotated[
        int, typer.Option(help="Refuse larger images unread (a decompression-bomb guard); raise it for huge images.")
    ] = MAX_IMAGE_PIXELS,
    overwrite: Annotated[bool, typer.Option("--overwrite")] = False,
) -> None:
    """Masks and colour overlays for images; unreadable images are reported and skipped. A model
    trained with --tile predicts tile by tile, at native resolution, in bounded memory."""
    options = dict(locals())  # the command's options, before any other name
    from segflow.export.predict import PredictConfig
    from segflow.stages import predict_stage

    summary = predict_stage(from_options(PredictConfig, options))
    typer.echo(f"{summary.predicted} images predicted ({summary.runtime}), {len(summary.skipped)} skipped -> {out}")
    for item in summary.skipped:
        typer.secho(f"  skipped {item['image']}: {item['reason']}", fg=typer.colors.YELLOW, err=True)


models_app = typer.Typer(help="The model family; bring checkpoints from OTX.")
app.add_typer(models_app, name="models")


@models_app.callback(invoke_without_command=True)
def models_cmd(
    ctx: typer.Context,
    size: Annotated[int, typer.Option(help="Input side for the GFLOPs column.")] = 512,
    num_classes: Annotated[int, typer.Option()] = 3,
) -> None:
    """The model family beside the published figures: parameters, MiB, GMAC and GFLOPs."""
    if ctx.invoked_subcommand is not None:
        return
    from segflow.models import MODEL_NAMES, PUBLISHED, model_cost

    typer.echo(
        f"{'model':15s} {'params':>10s} {'published':>10s} {'MiB':>6s} {'pub. MB':>7s} "
        f"{'GMAC':>6s} {'GFLOPs':>7s} {'pub. GFLOPs':>11s}"
    )
    for name in MODEL_NAMES:
        cost = model_cost(name, num_classes, size)
        ref = PUBLISHED[name]
        typer.echo(
            f"{name:15s} {cost['params']:>10,d} {ref['params']:>10,d} {cost['mib']:6.2f} "
            f"{ref['mb']:7.1f} {cost['gmac']:6.2f} {2 * cost['gmac']:7.2f} {ref['gflops']:11.2f}"
        )
    typer.echo(
        f"(GMAC counts convolutions and matmuls at {size}x{size}. The published figures are OpenVINO Training "
        "Extensions' (3 classes); their GFLOPs also count normalisation, activations and resizing.)"
    )


@models_app.command("convert")
def models_convert(
    checkpoint: Annotated[Path, typer.Argument(help="OTX / mmseg Lite-HRNet checkpoint: .ckpt, .pth or .safetensors.")],
    out: Annotated[str, typer.Option(help="Folder to create: path or s3://.")],
    from_: Annotated[str, typer.Option("--from", help="Where the checkpoint comes from (otx).")] = "otx",
    labels: Annotated[str, typer.Option(help="Comma-separated class names, in the head's order.")] = "",
    model: Annotated[str, typer.Option(help="Architecture; detected from the weights when omitted.")] = "",
    backbone_only: Annotated[
        bool, typer.Option("--backbone-only", help="Backbone weights for `segflow train --init-backbone`.")
    ] = False,
    input_size: Annotated[int, typer.Option(help="The model's input side (evaluation, export).")] = 512,
    overwrite: Annotated[bool, typer.Option("--overwrite")] = False,
) -> None:
    """Turn an OTX (OpenVINO Training Extensions) or mmsegmentation Lite-HRNet checkpoint into a
    segflow model folder, or backbone weights. Pickled checkpoints are read with weights_only=True."""
    from segflow.stages import convert_stage

    if from_ != "otx":
        raise SegflowError(f"--from {from_!r}: only otx (OTX / mmsegmentation Lite-HRNet) checkpoints convert.")
    names = [n.strip() for n in labels.split(",") if n.strip()]
    config = convert_stage(str(checkpoint), out, names, model, backbone_only, input_size, overwrite)
    what = "backbone weights" if backbone_only else f"model with {len(names)} classes ({', '.join(names)})"
    typer.echo(f"{config.architecture} {what} -> {out}")


@models_app.command("compare")
def models_compare(
    name: Annotated[str, typer.Argument(help="Registered model name (a pipeline's registered_model).")],
    versions: Annotated[list[str] | None, typer.Argument(help="Versions; default: @champion and @challenger.")] = None,
) -> None:
    """Registered versions side by side: mDice, mIoU and per-class Dice on their validation data,
    and the promotion decision of each (MLFLOW_TRACKING_URI, or the local store)."""
    from segflow import registry, tracking

    client = tracking.client()
    labels, table = registry.comparison(client, name, versions)
    width = max(12, *(len(label) for label in labels))
    typer.echo(f"{'metric (%)':24s}" + "".join(f"{label:>{width + 2}s}" for label in labels))
    for metric, values in table.items():
        cells = "".join(
            f"{100 * values[label]:>{width + 2}.2f}" if label in values else f"{'-':>{width + 2}s}" for label in labels
        )
        typer.echo(f"{metric:24s}{cells}")
    for label in labels:
        version = client.get_model_version(name, label.split()[0][1:])
        decision = version.tags.get(registry.DECISION, "?")
        typer.echo(f"{label}: {decision}: {version.tags.get(registry.REASON, '')}")


VARIADIC = ("--models",)  # options that take several values: `--models M1 M2` as well as `--models M1 --models M2`


def expand_variadic(argv: list[str]) -> list[str]:
    """``--models A B --out X`` -> ``--models A --models B --out X`` (click repeats options)."""
    out: list[str] = []
    variadic = None
    for arg in argv:
        if arg.startswith("-"):
            variadic = arg if arg in VARIADIC else None
            out.append(arg)
        elif variadic and out[-1] != variadic:
            out += [variadic, arg]
        else:
            out.append(arg)
    return out


def main(argv: list[str] | None = None) -> None:
    """The library's commands alone (``argv``: for calling it in-process). The installed ``segflow``
    command is :func:`segflow_kfp.cli.main`: these plus the pipeline commands."""
    run_app(app, argv)


def run_app(command: typer.Typer, argv: list[str] | None = None) -> None:
    """Run a typer app as the ``segflow`` command: user errors print one line and exit 2, SIGTERM
    unwinds every ``with``."""
    argv = expand_variadic(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    redact_logging()  # no password in a URI reaches the terminal or a pipeline log
    for noisy in ("alembic", "mlflow", "botocore", "urllib3", "datumaro", "matplotlib", "PIL"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    previous = _on_sigterm_unwind()
    try:
        command(args=argv, prog_name="segflow")
    except Terminated:
        typer.echo("terminated: the output was not published, and its staging folder and lock were removed", err=True)
        sys.exit(143)
    except SegflowError as exc:
        typer.secho(f"error: {exc}", fg=typer.colors.RED, err=True)
        sys.exit(exc.exit_code)
    except OSError as exc:
        if exc.filename is None:  # not about a path the user gave: a bug, keep the traceback
            raise
        # A path the environment refuses (permissions, a full disk, a read-only mount): no traceback.
        typer.secho(
            f"error: cannot use {exc.filename}: {exc.strerror or exc}. Check the path, its permissions and free space.",
            fg=typer.colors.RED,
            err=True,
        )
        sys.exit(SegflowError.exit_code)
    except KeyboardInterrupt:
        typer.echo("interrupted", err=True)
        sys.exit(130)
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


class Terminated(BaseException):
    """SIGTERM (kill, a pod's eviction) as an exception, so that every ``with`` unwinds: staging
    folders, partial files and locks are removed as on any failure."""


def _on_sigterm_unwind():
    """Raise :class:`Terminated` on SIGTERM; returns the handler it replaced (None off the main thread)."""
    import threading

    if threading.current_thread() is not threading.main_thread():
        return None

    def terminated(signum, frame):
        raise Terminated()

    return signal.signal(signal.SIGTERM, terminated)


if __name__ == "__main__":
    main()
