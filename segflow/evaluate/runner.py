"""Run a model over a labelled subset and score it (used by training's validation and by evaluate)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from segflow.evaluate.metrics import ConfusionMatrix


def eval_loader(dataset, batch_size: int, uniform_size: bool) -> DataLoader:
    """Images of one size batch together; mixed sizes go one at a time."""
    return DataLoader(dataset, batch_size=batch_size if uniform_size else 1, shuffle=False, num_workers=0)


@torch.no_grad()
def predict(model, images: torch.Tensor, size: tuple[int, int] | None = None) -> torch.Tensor:
    """Class probabilities, resized to ``size`` (the mask's) when given."""
    logits = model(images).logits.float()
    if size is not None and tuple(logits.shape[-2:]) != tuple(size):
        logits = F.interpolate(logits, size=size, mode="bilinear", align_corners=False)
    return logits.softmax(1)


@torch.no_grad()
def evaluate(model, loader: DataLoader, num_classes: int, device: torch.device, on_batch=None) -> dict:
    """Scores of ``model`` on ``loader``; ``on_batch(batch, probs)`` sees every prediction."""
    was_training = model.training
    model.eval()
    confusion = ConfusionMatrix(num_classes)
    for batch in loader:
        images = batch["image"].to(device)
        masks = batch["mask"].to(device)
        probs = predict(model, images, masks.shape[-2:])
        confusion.update(probs.argmax(1), masks)
        if on_batch is not None:
            on_batch(batch, probs)
    model.train(was_training)
    scores = confusion.scores()
    scores["confusion_matrix"] = confusion.matrix.tolist()
    return scores
