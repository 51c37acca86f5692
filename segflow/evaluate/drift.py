"""A label-free drift signal: how differently a model sees new images than its validation images.

    reference = statistics(model_dir, validation_images)      # stored with the registered version
    current = statistics(model_dir, new_images)                # on each retraining tick, no labels
    score, parts = drift_score(reference, current)

Three views of the same images, each in [0, 1]:
- **prediction entropy:** the relative change in mean normalised per-pixel entropy. A model that
  meets images unlike its training data grows unsure (the signal ADVENT minimises);
- **predicted classes:** the Jensen-Shannon divergence (base 2) between the predicted class
  distributions. A new camera or city changes what the model thinks it sees;
- **input colour:** the shift of the per-channel RGB mean in units of the reference's standard
  deviation, plus the change of that deviation (|log ratio|: contrast, noise, texture), capped
  at 1. Lighting, sensor and rendering change it first.

The score is their mean. It is a screening signal, not a measure of accuracy: benchmarks/RESULTS.md
gives its values on unshifted and shifted synthetic data, from which the default threshold comes.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch

from segflow.data.datasets import Normalization, image_files, read_rgb, to_tensor
from segflow.data.transforms import resize_for_eval
from segflow.models import artifact as model_artifact
from segflow.models import outputs

DEFAULT_THRESHOLD = 0.05  # unshifted synthetic data scores about 0.02, the target style about 0.1
MAX_IMAGES = 64  # a sample is enough for the statistics, and keeps a tick fast
MIN_REFERENCE_IMAGES = 16  # fewer validation images than this: the reference adds the training images


def statistics(model_dir: str | Path, images: list[Path] | str | Path, max_images: int = MAX_IMAGES) -> dict:
    """Mean normalised entropy, predicted class distribution and RGB mean/std of ``images``."""
    files = image_files(images) if isinstance(images, str | Path) else list(images)
    files = files[:: max(1, math.ceil(len(files) / max_images))][:max_images]
    model, config = model_artifact.load(model_dir, "cpu")
    norm = Normalization(**config["normalization"])
    classes = len(config["labels"])
    counts = np.zeros(classes, dtype=np.float64)
    entropy, pixels = 0.0, 0
    rgb_sum, rgb_sq, rgb_n = np.zeros(3), np.zeros(3), 0
    with torch.no_grad():
        for path in files:
            image = read_rgb(path)
            flat = image.reshape(-1, 3).astype(np.float64) / 255.0
            rgb_sum += flat.sum(0)
            rgb_sq += (flat**2).sum(0)
            rgb_n += len(flat)
            x = to_tensor(resize_for_eval(image, config["input_size"]), norm.mean, norm.std)[None]
            probs = outputs.probabilities(model(x).logits, tuple(x.shape[-2:]))
            entropy += float(outputs.entropy_map(probs).sum())
            counts += np.bincount(probs.argmax(1).flatten().numpy(), minlength=classes)
            pixels += probs.shape[-1] * probs.shape[-2]
    mean = rgb_sum / rgb_n
    return {
        "images": len(files),
        "mean_entropy": entropy / pixels,
        "class_distribution": (counts / counts.sum()).tolist(),
        "labels": config["labels"],
        "rgb_mean": mean.tolist(),
        "rgb_std": np.sqrt(np.maximum(rgb_sq / rgb_n - mean**2, 1e-12)).tolist(),
    }


def _js_divergence(p: list[float], q: list[float]) -> float:
    p_, q_ = np.asarray(p) + 1e-12, np.asarray(q) + 1e-12
    p_, q_ = p_ / p_.sum(), q_ / q_.sum()
    m = (p_ + q_) / 2
    return float(0.5 * (p_ * np.log2(p_ / m)).sum() + 0.5 * (q_ * np.log2(q_ / m)).sum())


def drift_score(reference: dict, current: dict) -> tuple[float, dict]:
    """(score in [0, 1], its three parts) of ``current`` against ``reference``."""
    ref_std = np.maximum(reference["rgb_std"], 1e-3)
    shift = np.abs(np.subtract(current["rgb_mean"], reference["rgb_mean"])) / ref_std
    spread = np.abs(np.log(np.maximum(current["rgb_std"], 1e-3) / ref_std))  # contrast, noise, texture
    parts = {
        "entropy": min(
            1.0, abs(current["mean_entropy"] - reference["mean_entropy"]) / max(reference["mean_entropy"], 0.05)
        ),
        "classes": min(1.0, _js_divergence(reference["class_distribution"], current["class_distribution"])),
        "colour": min(1.0, float(shift.mean() + spread.mean())),
    }
    return float(np.mean(list(parts.values()))), parts


def drift_chart(reference: dict, current: dict, score: float, out_png: Path) -> Path:
    """Predicted class shares side by side, with the entropy and the score in the title."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = reference["labels"]
    x = np.arange(len(labels))
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(10, 3.8), dpi=100, gridspec_kw={"width_ratios": [3, 1]})
    ax.bar(x - 0.2, [100 * v for v in reference["class_distribution"]], 0.4, label="champion's validation images")
    ax.bar(x + 0.2, [100 * v for v in current["class_distribution"]], 0.4, label="new images")
    ax.set_xticks(x, labels, rotation=30, ha="right")
    ax.set_ylabel("% of predicted pixels")
    ax.legend()
    ax.set_title(f"drift score {score:.3f}")
    ax2.bar(["reference", "new"], [reference["mean_entropy"], current["mean_entropy"]], color=["C0", "C1"])
    ax2.set_ylim(0, 1)
    ax2.set_title("mean normalised entropy")
    fig.tight_layout()
    fig.savefig(out_png)
    plt.close(fig)
    return out_png
