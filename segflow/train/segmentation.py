"""Segmentation training: the model, its data and its objective, handed to the one engine.

Inputs and outputs are local folders (``segflow.stages`` stages s3:// and does MLflow):

    train_segmenter(cfg, data_dir, out_dir, checkpoints, unlabeled_dir=None, backbone_dir=None)

The published MODEL_DIR holds the best epoch's weights, ``config.json`` and ``training.json``
(``segflow.models.artifact``).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

import numpy as np
from PIL import Image

from segflow.data import manifest as manifest_lib
from segflow.data.datasets import Normalization, SegmentationDataset, UnlabeledImages
from segflow.errors import SegflowError
from segflow.evaluate.scoring import eval_loader, score, score_images
from segflow.models import artifact as model_artifact
from segflow.models.lite_hrnet import SPECS
from segflow.models.tiling import Tiling, auto_tiling
from segflow.train.config import TrainConfig
from segflow.train.loop import fit, training_for
from segflow.train.objective import Objective, Stream
from segflow.train.objectives import MeanTeacher, SupCon

log = logging.getLogger(__name__)


def make_objective(cfg: TrainConfig, num_classes: int, feature_channels: int, unlabeled: Stream | None) -> Objective:
    if cfg.supcon is not None:
        return SupCon(cfg.supcon, num_classes, feature_channels)
    if cfg.mean_teacher is not None:
        return MeanTeacher(cfg.mean_teacher, unlabeled)
    return Objective()


def choose_tiling(cfg: TrainConfig, data_dir: Path, names: list[str]) -> tuple[Tiling | None, str]:
    """The tiling a run trains with, and why: ``--tile SIZE``, ``--tile auto`` (OTX's rule over up
    to 64 training masks), or none."""
    if cfg.tile == 0:
        return None, "off"
    if cfg.tile > 0:
        return Tiling(cfg.tile, cfg.tile_overlap, cfg.tile_scale), "--tile"
    masks = [np.asarray(Image.open(data_dir / cfg.labeled_subset / "masks" / f"{n}.png")) for n in names[:64]]
    tiling = auto_tiling(masks, cfg.tile_overlap, cfg.tile_scale)
    if tiling is None:
        log.warning("--tile auto: images too small for two tiles of their objects' size; training on whole images")
        return None, "auto: images too small to tile"
    log.warning("--tile auto: tiles of %d px (median object ~3%% of a tile)", tiling.size)
    return tiling, "auto"


def train_segmenter(
    cfg: TrainConfig,
    data_dir: Path,
    out_dir: Path,
    checkpoints: Path,
    unlabeled_dir: Path | None = None,
    backbone_dir: Path | None = None,
    on_epoch: Callable[[int, dict], None] | None = None,
    init_model_dir: Path | None = None,
) -> dict:
    """Train, validate every epoch, publish the best model into ``out_dir``; return the result."""
    cfg.validate()
    started = time.monotonic()
    manifest = manifest_lib.read(data_dir, verify=True)
    labels = manifest["labels"]
    stats = manifest["statistics"]
    norm = Normalization(stats["mean"], stats["std"])
    names = manifest["subsets"].get(cfg.labeled_subset, {}).get("items")
    if names is None:
        raise SegflowError(f"{cfg.data} has no {cfg.labeled_subset!r} subset to train on.")
    if "val" not in manifest["subsets"]:
        raise SegflowError(f"{cfg.data} has no val subset: import it with `segflow data import` to split one off.")
    names = sorted(names)[: cfg.max_labeled] if cfg.max_labeled else None
    tiling, chosen_by = choose_tiling(cfg, data_dir, names or sorted(manifest["subsets"][cfg.labeled_subset]["items"]))
    size = tiling.size if tiling else cfg.input_size
    train_ds = SegmentationDataset(
        data_dir,
        cfg.labeled_subset,
        size,
        norm,
        True,
        cfg.seed,
        names=names,
        views=cfg.supcon is not None,
        tile_scale=tiling.scale if tiling else 0.0,
    )
    val_ds = SegmentationDataset(data_dir, "val", size, norm, False)
    val_loader = eval_loader(val_ds, cfg.batch_size, stats["min_size"] == stats["max_size"])
    # A tiled model is validated on whole images through the same tiled inference as deployment.
    tiled_config = {"labels": labels, "normalization": norm.as_dict(), "tiling": tiling.as_dict() if tiling else None}
    unlabeled = None
    if cfg.mean_teacher is not None:
        images = UnlabeledImages(unlabeled_dir, cfg.input_size, norm, seed=cfg.seed, strong=True)
        unlabeled = Stream(images, cfg.mean_teacher.unlabeled_batch_size or cfg.batch_size)

    objective = make_objective(cfg, len(labels), SPECS[cfg.model].head_channels, unlabeled)

    if init_model_dir is not None:
        start = model_artifact.read_config(init_model_dir)
        if start["labels"] != labels or start["architecture"] != cfg.model:
            raise SegflowError(
                f"--init-model {cfg.init_model}: a {start['architecture']} model of classes {start['labels']} cannot "
                f"start a {cfg.model} model of classes {labels}; use a model trained on these classes, or "
                "--init-backbone."
            )

    def build():
        if init_model_dir is not None:
            return model_artifact.create_from(init_model_dir)
        return model_artifact.with_backbone(cfg.model, len(labels), backbone_dir)

    def validate(model) -> dict:
        device = next(model.parameters()).device
        if tiling is not None:
            scores = score_images(model, val_ds, tiled_config, device)
        else:
            scores = score(model, val_loader, len(labels), device)
        return {"score": scores["mDice"], "mDice": scores["mDice"], "mIoU": scores["mIoU"]}

    def publish(model, summary: dict) -> None:
        config = model_artifact.model_config(
            model,
            labels,
            size,
            norm.as_dict(),
            manifest["fingerprint"],
            manifest_lib.dataset_ids(manifest),
            tiling=tiling.as_dict() if tiling else None,
        )
        model_artifact.save(out_dir, model, config)
        (out_dir / "training.json").write_text(json.dumps(training_record(summary), indent=2, default=str) + "\n")

    def training_record(summary: dict) -> dict:
        return {
            "best_val_mDice": summary["best_score"],
            "best_epoch": summary["best_epoch"],
            "epochs_run": summary["epochs_run"],
            "iterations": summary["iterations"],
            "history": summary["history"],
            "objective": summary["objective"],
            "labeled_images": len(train_ds),
            "config": asdict(cfg),
            "tiling": tiling.as_dict() if tiling else None,
            "tiling_chosen_by": chosen_by,
            "dataset_fingerprint": manifest["fingerprint"],
        }

    run = training_for(
        cfg,
        paths=("data",),
        fingerprints={"dataset_fingerprint": manifest["fingerprint"]},
        build_model=build,
        objective=objective,
        data=train_ds,
        checkpoints=checkpoints,
        validate=validate,
        publish=publish,
    )
    summary = fit(run, on_epoch)
    result = training_record(summary)
    result["metrics"] = {
        "best_val_mDice": summary["best_score"],
        "best_epoch": summary["best_epoch"],
        "epochs_run": summary["epochs_run"],
        "train_seconds": round(time.monotonic() - started, 1),
    }
    return result
