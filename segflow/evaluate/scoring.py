"""Run a model over a labelled subset and score it: the one scoring loop, used by training's
validation, by ``segflow evaluate`` and by export's parity check."""

from __future__ import annotations

from collections.abc import Callable, Iterable

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader

from segflow.data.datasets import read_rgb
from segflow.evaluate.metrics import ConfusionMatrix
from segflow.models.outputs import upsample
from segflow.models.tiling import segment_image


def eval_loader(dataset, batch_size: int, uniform_size: bool) -> DataLoader:
    """Images of one size batch together; mixed sizes go one at a time."""
    return DataLoader(dataset, batch_size=batch_size if uniform_size else 1, shuffle=False, num_workers=0)


@torch.no_grad()
def score(
    model,
    batches: Iterable[dict],
    num_classes: int,
    device: torch.device | str = "cpu",
    keep: Callable[[dict, torch.Tensor], None] | None = None,
) -> dict:
    """Scores of ``model`` (a Segmentor or an IR, in eval mode) over ``batches`` of image + mask.

    ``keep(batch, logits)`` sees every batch's raw logits (at the model's output size, on CPU),
    for pictures or a parity check.
    """
    confusion = ConfusionMatrix(num_classes)
    for batch in batches:
        images = batch["image"].to(device)
        masks = batch["mask"].to(device)
        logits = model(images).logits.float()
        confusion.update(upsample(logits, masks.shape[-2:]).argmax(1), masks)
        if keep is not None:
            keep(batch, logits.cpu())
    return _scores(confusion)


def score_images(
    model,
    dataset,
    config: dict,
    device: torch.device | str = "cpu",
    keep: Callable[[int, np.ndarray, np.ndarray], None] | None = None,
    keep_first: int = 0,
) -> dict:
    """Scores of a tiled model over a SegmentationDataset's full-size images, each segmented as
    deployment does (:func:`segflow.models.tiling.segment_image`). ``keep(index, labels,
    entropy)`` sees the first ``keep_first`` images' predictions, for pictures."""
    confusion = ConfusionMatrix(len(config["labels"]))
    for index in range(len(dataset)):
        image = read_rgb(dataset.images[index])
        truth = np.array(Image.open(dataset.masks[index]))
        wanted = keep is not None and index < keep_first
        labels, entropy = segment_image(model, image, config, entropy=wanted, device=device)
        confusion.update(torch.from_numpy(labels), torch.from_numpy(truth))
        if wanted:
            keep(index, labels, entropy.astype(np.float32))
    return _scores(confusion)


def _scores(confusion: ConfusionMatrix) -> dict:
    scores = confusion.scores()
    scores["confusion_matrix"] = confusion.matrix.tolist()
    return scores
