"""Domain adaptation: a source-trained model, source data, target images and an adaptation
objective, handed to the one engine. Inputs and outputs are local folders:

    adapt(cfg, source_dir, target_dir, init_dir, out_dir, checkpoints)

TARGET is a plain folder of images, or a dataset artifact. A dataset's labels are never trained on:
its train images feed the target stream and its val subset chooses the snapshot (target val mDice).
Without target labels the snapshot with the lowest mean normalised entropy on target images wins:
a label-free criterion (confident predictions on the new domain), recorded in the artifact.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

from torch.utils.data import DataLoader

from segflow.adapt.config import AdaptConfig
from segflow.adapt.objectives import make_objective
from segflow.configs import flatten
from segflow.data import manifest as manifest_lib
from segflow.data.datasets import Normalization, SegmentationDataset, UnlabeledImages, image_files
from segflow.errors import SegflowError
from segflow.evaluate.scoring import eval_loader, score
from segflow.models import artifact as model_artifact
from segflow.models.outputs import entropy_map, probabilities
from segflow.train.engine import Stream, Training, fit

log = logging.getLogger(__name__)
LABEL_FREE = "lowest mean normalised entropy on target images (label-free)"
WITH_LABELS = "highest target val mDice"


def _target(cfg: AdaptConfig, target_dir: Path, labels: list[str]) -> tuple[Path, dict | None]:
    """(folder of target images to adapt on, the target dataset's manifest or None)."""
    if (target_dir / manifest_lib.MANIFEST).exists():
        manifest = manifest_lib.read(target_dir, verify=True)
        if manifest["labels"] != labels:
            raise SegflowError(
                f"--target {cfg.target} has labels {manifest['labels']} but --source has {labels}: adaptation "
                "needs one label set. Import the target with the source's label map."
            )
        if "train" not in manifest["subsets"]:
            raise SegflowError(f"--target {cfg.target} has no train subset of images to adapt on.")
        return target_dir / "train" / "images", manifest
    image_files(target_dir)  # a clear error for an empty folder or one without images
    return target_dir, None


def adapt(
    cfg: AdaptConfig,
    source_dir: Path,
    target_dir: Path,
    init_dir: Path,
    out_dir: Path,
    checkpoints: Path,
    on_epoch: Callable[[int, dict], None] | None = None,
) -> dict:
    """Adapt the model in ``init_dir`` to the target; publish the chosen snapshot into ``out_dir``."""
    cfg.validate()
    started = time.monotonic()
    source = manifest_lib.read(source_dir, verify=True)
    labels = source["labels"]
    init = model_artifact.read_config(init_dir)  # a model folder: an IR, a backbone or an ensemble is refused
    if cfg.model and cfg.model != init["architecture"]:
        raise SegflowError(
            f"--init {cfg.init} holds a {init['architecture']!r} model but --model is {cfg.model!r}: "
            "adapt the architecture the model was trained with, or train that one on the source first."
        )
    if init["labels"] != labels:
        raise SegflowError(
            f"--init {cfg.init} predicts {init['labels']} but --source has labels {labels}: start from a "
            "model trained on this source."
        )
    target_images, target_manifest = _target(cfg, target_dir, labels)
    norm = Normalization(**init["normalization"])  # the model's own: source and target alike
    source_ds = SegmentationDataset(source_dir, "train", cfg.input_size, norm, True, cfg.seed)
    target_ds = UnlabeledImages(target_images, cfg.input_size, norm, seed=cfg.seed + 17)
    objective = make_objective(cfg, len(labels), Stream(target_ds, cfg.batch_size), norm)
    validate, criterion = _validation(cfg, target_dir, target_images, target_manifest, norm, len(labels))
    arch = init["architecture"]

    def build():
        return model_artifact.create_from(init_dir, aux=cfg.multi_level)

    summary_extra = {
        "method": objective.name,
        "levels": cfg.levels if cfg.multi_level else "single",
        "selection": {"criterion": criterion},
        "source_fingerprint": source["fingerprint"],
        "target_fingerprint": target_manifest["fingerprint"] if target_manifest else "",
        "target_images": len(target_ds),
    }

    def publish(model, summary: dict) -> None:
        norm_dict, fingerprint = init["normalization"], source["fingerprint"]
        config = model_artifact.model_config(
            model, labels, cfg.input_size, norm_dict, fingerprint, init.get("dataset_ids")
        )
        model_artifact.save(out_dir, model, config)
        (out_dir / "training.json").write_text(json.dumps(record(summary), indent=2, default=str) + "\n")

    def record(summary: dict) -> dict:
        selection = {**summary_extra["selection"], "epoch": summary["best_epoch"], "score": summary["best_score"]}
        return {
            **summary_extra,
            "selection": selection,
            "architecture": arch,
            "snapshots": summary["epochs_run"],
            "iterations": summary["iterations"],
            "history": summary["history"],
            "config": asdict(cfg),
        }

    identity = {k: v for k, v in flatten(cfg).items() if k not in ("source", "target", "init")}
    identity.update(source=source["fingerprint"], target=summary_extra["target_fingerprint"] or str(cfg.target))
    run = Training(
        build_model=build,
        objective=objective,
        data=source_ds,
        loop=cfg.loop(),
        recipe=cfg.recipe(),
        checkpoints=checkpoints,
        identity=identity,
        may_change=AdaptConfig.RESUME_MAY_CHANGE,
        validate=validate,
        score="target val mDice" if target_manifest else "-target entropy",
        publish=publish,
    )
    summary = fit(run, on_epoch)
    result = record(summary)
    best = next((h for h in summary["history"] if h["epoch"] == summary["best_epoch"] - 1), {})
    result["metrics"] = {
        "best_target_score": summary["best_score"],
        "best_iteration": summary["best_epoch"] * cfg.loop().iters_per_epoch,
        **{k: v for k, v in best.items() if k.startswith("val_")},
        "train_seconds": round(time.monotonic() - started, 1),
    }
    return result


def _validation(cfg: AdaptConfig, target_dir: Path, images: Path, manifest: dict | None, norm, num_classes: int):
    """(score function for snapshots, the criterion in words)."""
    if manifest is not None and "val" in manifest["subsets"]:
        stats = manifest["statistics"]
        dataset = SegmentationDataset(target_dir, "val", cfg.input_size, norm, False)
        loader = eval_loader(dataset, cfg.batch_size, stats["min_size"] == stats["max_size"])

        def with_labels(model) -> dict:
            device = next(model.parameters()).device
            scores = score(model, loader, num_classes, device)
            return {"score": scores["mDice"], "target_mDice": scores["mDice"], "target_mIoU": scores["mIoU"]}

        return with_labels, WITH_LABELS
    files = UnlabeledImages(images, cfg.input_size, norm, evaluation=True, limit=cfg.validation_images)
    loader = DataLoader(files, batch_size=1, shuffle=False)

    def label_free(model) -> dict:
        device = next(model.parameters()).device
        entropies = [entropy_map(probabilities(model(b["image"].to(device)).logits)).mean().item() for b in loader]
        mean = sum(entropies) / len(entropies)
        return {"score": -mean, "target_entropy": mean}

    return label_free, LABEL_FREE


__all__ = ["adapt"]
