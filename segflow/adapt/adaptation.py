"""Domain adaptation: a source-trained model, source data, target images and an adaptation
objective, handed to the one engine. Inputs and outputs are local folders:

    adapt(cfg, source_dir, target_dir, init_dir, out_dir, checkpoints)

TARGET is a plain folder of images, or a dataset artifact. A dataset's labels are never trained on:
its train images feed the target stream and its val subset chooses the snapshot (target val mDice).
Without target labels a label-free criterion chooses (``selection.py`` says which and why); every
snapshot's label-free measurements are recorded in the artifact's history either way.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import asdict, replace
from pathlib import Path

from torch.utils.data import DataLoader, Subset

from segflow.adapt import selection
from segflow.adapt.config import AdaptConfig
from segflow.adapt.objectives import make_objective
from segflow.data import manifest as manifest_lib
from segflow.data.datasets import Normalization, SegmentationDataset, UnlabeledImages, image_files
from segflow.errors import SegflowError
from segflow.evaluate.scoring import eval_loader, score
from segflow.models import artifact as model_artifact
from segflow.train.loop import fit, training_for
from segflow.train.objective import Stream

log = logging.getLogger(__name__)
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
    if not cfg.input_size:  # the size the model was trained at
        cfg = replace(cfg, input_size=int(init["input_size"]))
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
    datasets = {"source": (source_dir, source), "target": (target_dir, target_manifest)}
    validate, criterion = _validation(cfg, datasets, target_images, init_dir, norm)
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

    run = training_for(
        cfg,
        paths=("source", "target", "init"),
        fingerprints={
            "source": source["fingerprint"],
            "target": summary_extra["target_fingerprint"] or str(cfg.target),
        },
        build_model=build,
        objective=objective,
        data=source_ds,
        checkpoints=checkpoints,
        validate=validate,
        score=criterion,
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


def _validation(
    cfg: AdaptConfig,
    datasets: dict[str, tuple[Path, dict | None]],
    images: Path,
    init_dir: Path,
    norm: Normalization,
):
    """(score function for snapshots, the criterion in words). Every snapshot is measured without
    target labels (and with them, when the target dataset has a val subset); ``cfg.select`` says
    which number chooses."""
    with_val = {name: m is not None and "val" in m["subsets"] for name, (_, m) in datasets.items()}
    num_classes = len(datasets["source"][1]["labels"])
    rule = _rule(cfg, with_val["target"], with_val["source"])
    limit = cfg.validation_images
    target_files = UnlabeledImages(images, cfg.input_size, norm, evaluation=True, limit=limit)
    target_loader = DataLoader(target_files, batch_size=1, shuffle=False)
    loaders = {}
    for name, (folder, manifest) in datasets.items():
        if with_val[name]:
            dataset = SegmentationDataset(folder, "val", cfg.input_size, norm, False)
            # The source's val images are only a guard: a sample of them.
            subset = Subset(dataset, range(min(limit, len(dataset)))) if name == "source" else dataset
            uniform = manifest["statistics"]["min_size"] == manifest["statistics"]["max_size"]
            loaders[name] = eval_loader(subset, cfg.batch_size, uniform)
    reference: list = []  # the starting model's target predictions, made once

    def measure(model) -> dict:
        device = next(model.parameters()).device
        if not reference:
            start = model_artifact.load(init_dir, device)[0]
            reference.extend(selection.target_predictions(start, target_loader, device))
        scores = selection.measure_target(model, target_loader, num_classes, device, reference)
        if "source" in loaders:
            scores["source_mDice"] = score(model, loaders["source"], num_classes, device)["mDice"]
        scores.update(selection.criterion_scores(scores))
        if "target" in loaders:
            labelled_scores = score(model, loaders["target"], num_classes, device)
            scores.update(target_mDice=labelled_scores["mDice"], target_mIoU=labelled_scores["mIoU"])
        scores["score"] = scores["target_mDice"] if rule == "labels" else scores[f"select_{rule}"]
        return scores

    return measure, WITH_LABELS if rule == "labels" else selection.DESCRIPTIONS[rule]


def _rule(cfg: AdaptConfig, labelled: bool, source_val: bool) -> str:
    """``labels`` or the label-free criterion's name, from ``--select``."""
    aliases = {"auto": "labels" if labelled else selection.DEFAULT, "label-free": selection.DEFAULT}
    rule = aliases.get(cfg.select, cfg.select)
    if rule == "labels" and not labelled:
        raise SegflowError(
            f"--select labels needs target labels: --target {cfg.target} is not a dataset with a val subset. "
            "Import the target with a val subset, or choose --select label-free."
        )
    if rule == "source" and not source_val:
        raise SegflowError(f"--select source needs a val subset in --source {cfg.source}; choose --select label-free.")
    return rule


__all__ = ["adapt"]
