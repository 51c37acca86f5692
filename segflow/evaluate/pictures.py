"""Pictures for humans: a confusion-matrix heatmap and image / ground truth / prediction overlays."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from segflow.palette import palette


def confusion_heatmap(matrix: list[list[int]], labels: list[str], out_png: Path) -> Path:
    """Row-normalised confusion matrix (rows: ground truth)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    m = np.asarray(matrix, dtype=np.float64)
    share = m / np.maximum(m.sum(1, keepdims=True), 1)
    size = max(4.0, 0.55 * len(labels) + 2)
    fig, ax = plt.subplots(figsize=(size + 1, size), dpi=100)
    image = ax.imshow(share, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(len(labels)), labels, rotation=45, ha="right")
    ax.set_yticks(range(len(labels)), labels)
    ax.set_xlabel("predicted")
    ax.set_ylabel("ground truth")
    if len(labels) <= 20:
        for i in range(len(labels)):
            for j in range(len(labels)):
                ax.text(
                    j,
                    i,
                    f"{share[i, j]:.2f}",
                    ha="center",
                    va="center",
                    fontsize=7,
                    color="white" if share[i, j] > 0.5 else "black",
                )
    fig.colorbar(image, ax=ax, fraction=0.046)
    ax.set_title("Confusion (row-normalised)")
    fig.tight_layout()
    fig.savefig(out_png)
    plt.close(fig)
    return out_png


def overlay(image: np.ndarray, mask: np.ndarray, colours: np.ndarray, alpha: float = 0.55) -> np.ndarray:
    colour = colours[mask].astype(np.float32)
    blended = (1 - alpha) * image.astype(np.float32) + alpha * colour
    blended[mask == 255] = image[mask == 255]
    return blended.astype(np.uint8)


def entropy_colours(entropy: np.ndarray) -> np.ndarray:
    """A normalised entropy map (0-1) as RGB: dark where the model is sure, bright where it is not."""
    from matplotlib import colormaps

    return (255 * colormaps["magma"](np.clip(entropy, 0, 1))[..., :3]).astype(np.uint8)


def panel_grid(rows: list[list[np.ndarray]], out_png: Path) -> Path:
    """RGB panels in rows, each row scaled to the shortest image's height, white gaps between."""
    from PIL import Image

    h = min(panel.shape[0] for row in rows for panel in row)
    lines = []
    for row in rows:
        scaled = []
        for panel in row:
            if panel.shape[0] != h:
                w = max(1, round(panel.shape[1] * h / panel.shape[0]))
                panel = np.asarray(Image.fromarray(panel).resize((w, h), Image.Resampling.NEAREST))
            scaled += [panel, np.full((h, 4, 3), 255, np.uint8)]
        lines.append(np.concatenate(scaled[:-1], 1))
    width = max(line.shape[1] for line in lines)
    lines = [np.pad(line, ((0, 4), (0, width - line.shape[1]), (0, 0)), constant_values=255) for line in lines]
    Image.fromarray(np.concatenate(lines, 0)).save(out_png)
    return out_png


def overlay_grid(rows: list[tuple[np.ndarray, np.ndarray, np.ndarray]], num_classes: int, out_png: Path) -> Path:
    """One row per sample: image, ground-truth overlay, prediction overlay."""
    colours = palette(num_classes)
    return panel_grid([[i, overlay(i, t, colours), overlay(i, p, colours)] for i, t, p in rows], out_png)


def comparison_grid(rows: list[dict], num_classes: int, out_png: Path) -> Path:
    """One row per sample: image | truth | baseline prediction and entropy | model prediction and entropy.
    Each row dict: image, truth, and per model ("baseline", "model") its prediction and entropy."""
    colours = palette(num_classes)
    panels = []
    for r in rows:
        row = [r["image"], overlay(r["image"], r["truth"], colours)]
        for name in ("baseline", "model"):
            row += [overlay(r["image"], r[name]["prediction"], colours), entropy_colours(r[name]["entropy"])]
        panels.append(row)
    return panel_grid(panels, out_png)
