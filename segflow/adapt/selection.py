"""Which adaptation snapshot to keep when the target has no labels.

The old rule kept the snapshot with the lowest mean target entropy. Entropy minimisation and
self-training drive exactly that number down whatever their accuracy, so the rule preferred the
most over-confident snapshot, collapse included. Every snapshot is now measured four ways on
unlabelled target images (and held-out source images), each recorded in the artifact's history:

- ``confidence``: minus the mean normalised target entropy (the old rule, kept for comparison);
- ``consistency``: how well the snapshot agrees with itself on a rescaled, mirrored view of each
  target image, as an IoU averaged over all classes (a class it never predicts scores 0, so
  collapsing onto a few classes costs, where confidence rewards it);
- ``agreement``: the same all-class IoU against the starting (source-trained) model;
- ``source``: mDice on the source's labelled val images (forgetting the source shows there).

``CRITERIA`` turns those measurements into one score per snapshot (higher is better); ``DEFAULT``
is the one ``segflow adapt`` chooses by. benchmarks/real_camvid.py compares them against the choice
target labels would have made (RESULTS.md, "Real street scenes: CamVid day -> dusk").
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
import torch.nn.functional as F

from segflow.evaluate.metrics import ConfusionMatrix
from segflow.models.outputs import entropy_map, probabilities, upsample

VIEW_SCALE = 0.75  # the second view: 3/4 size, mirrored


def all_class_iou(confusion: ConfusionMatrix) -> float:
    """Mean IoU over every class, a class absent from both sides counting 0."""
    return sum(v or 0.0 for v in confusion.scores()["iou"]) / confusion.num_classes


def _view_prediction(model, images: torch.Tensor) -> torch.Tensor:
    """Labels predicted from the rescaled, mirrored view, brought back to the image's frame."""
    small = F.interpolate(images, scale_factor=VIEW_SCALE, mode="bilinear", align_corners=False)
    logits = model(small.flip(-1)).logits.float().flip(-1)
    return upsample(logits, images.shape[-2:]).argmax(1)


@torch.no_grad()
def target_predictions(model, batches: Iterable[dict], device) -> list[torch.Tensor]:
    """Per-image labels of ``model`` on target images (the reference ``agreement`` compares with)."""
    return [
        upsample(model(b["image"].to(device)).logits.float(), b["image"].shape[-2:]).argmax(1).cpu() for b in batches
    ]


@torch.no_grad()
def measure_target(model, batches: Iterable[dict], num_classes: int, device, reference: list[torch.Tensor]) -> dict:
    """Entropy, self-consistency and agreement with ``reference`` on unlabelled target images."""
    consistency, agreement = ConfusionMatrix(num_classes), ConfusionMatrix(num_classes)
    entropies = []
    for batch, ref in zip(batches, reference, strict=True):
        images = batch["image"].to(device)
        logits = upsample(model(images).logits.float(), images.shape[-2:])
        labels = logits.argmax(1)
        entropies.append(entropy_map(probabilities(logits)).mean().item())
        consistency.update(_view_prediction(model, images), labels)
        agreement.update(labels.cpu(), ref)
    return {
        "target_entropy": sum(entropies) / len(entropies),
        "consistency": all_class_iou(consistency),
        "agreement": all_class_iou(agreement),
    }


Criterion = Callable[[dict], float]
CRITERIA: dict[str, Criterion] = {
    "confidence": lambda m: -m["target_entropy"],
    "consistency": lambda m: m["consistency"],
    "agreement": lambda m: m["agreement"],
    "source": lambda m: m["source_mDice"],
}
DEFAULT = "consistency"
DESCRIPTIONS = {
    "confidence": "lowest mean normalised entropy on target images (label-free)",
    "consistency": "highest all-class IoU between target predictions and a rescaled mirrored view (label-free)",
    "agreement": "highest all-class IoU with the source-trained model on target images (label-free)",
    "source": "highest mDice on the source's val images (no target labels)",
}
SELECT_CHOICES = ("auto", "labels", "label-free", *CRITERIA)


def criterion_scores(measures: dict) -> dict:
    """Every criterion's score for one snapshot, named ``select_<criterion>``."""
    return {f"select_{name}": rule(measures) for name, rule in CRITERIA.items()}


def picks(history: list[dict], labelled: str = "val_target_mIoU") -> dict[str, dict]:
    """For a run whose target val subset had labels: the snapshot each criterion would have kept
    and its ``labelled`` score, beside the oracle's (the snapshot the labels pick)."""
    chosen = {"oracle": max(history, key=lambda h: h[labelled])}
    chosen |= {name: max(history, key=lambda h, n=name: h[f"val_select_{n}"]) for name in CRITERIA}
    return {name: {"epoch": h["epoch"], "score": h[labelled]} for name, h in chosen.items()}


__all__ = ["CRITERIA", "DEFAULT", "DESCRIPTIONS", "SELECT_CHOICES", "criterion_scores", "measure_target", "picks"]
