"""The evaluation stage: score a model artifact on a labelled subset; write metrics and pictures.

EVAL_DIR/
  metrics.json            mDice, mIoU (fractions), pixel accuracy, per-class Dice/IoU, confusion matrix
  confusion_matrix.png    row-normalised heatmap
  predictions.png         image | ground truth | prediction, a few samples
  comparison.png          with a baseline: image | truth | baseline prediction, entropy | model prediction, entropy
  report.md
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from segflow.data import manifest as manifest_lib
from segflow.data.datasets import Normalization, SegmentationDataset, read_rgb
from segflow.errors import SegflowError
from segflow.evaluate.pictures import comparison_grid, confusion_heatmap, overlay_grid
from segflow.evaluate.scoring import eval_loader, score, score_images
from segflow.models import artifact as model_artifact
from segflow.models.outputs import entropy_map, probabilities


@dataclass(frozen=True)
class EvalConfig:
    model: str
    data: str
    out: str
    subset: str = "val"
    batch_size: int = 8
    num_pictures: int = 6
    baseline: str = ""  # another model (e.g. source-only) scored beside, and pictured with its entropy
    overwrite: bool = False


def run_evaluation(
    cfg: EvalConfig, model_dir: Path, data_dir: Path, out_dir: Path, baseline_dir: Path | None = None
) -> dict:
    """Score the model in ``model_dir`` on ``data_dir``'s subset; write metrics and pictures into ``out_dir``."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model, config = model_artifact.load(model_dir, device)
    baseline, baseline_config = model_artifact.load(baseline_dir, device) if baseline_dir is not None else (None, {})
    manifest = manifest_lib.read(data_dir, verify=True)
    labels = config["labels"]
    if manifest["labels"] != labels:
        raise SegflowError(
            f"--data {cfg.data} has labels {manifest['labels']} but the model predicts {labels}: "
            "evaluate on data with the model's label map."
        )
    if cfg.subset not in manifest["subsets"]:
        raise SegflowError(f"--data {cfg.data} has no {cfg.subset!r} subset ({', '.join(manifest['subsets'])}).")
    norm = Normalization(**config["normalization"])
    dataset = SegmentationDataset(data_dir, cfg.subset, config["input_size"], norm, train=False)
    stats = manifest["statistics"]
    loader = eval_loader(dataset, cfg.batch_size, stats["min_size"] == stats["max_size"])
    samples: dict[int, dict] = {}  # the first images: pixels, truth, and each model's prediction + entropy

    def keeper(name: str):
        def keep(batch: dict, logits: torch.Tensor) -> None:
            for index, out in zip(batch["index"].tolist(), logits, strict=True):
                if index < cfg.num_pictures:
                    truth = np.asarray(Image.open(dataset.masks[index]))
                    probs = probabilities(out[None], truth.shape)
                    sample = samples.setdefault(index, {"image": read_rgb(dataset.images[index]), "truth": truth})
                    prediction = probs.argmax(1)[0].numpy().astype(np.uint8)
                    sample[name] = {"prediction": prediction, "entropy": entropy_map(probs)[0].numpy()}

        return keep

    def tiled_keeper(name: str):
        def keep(index: int, prediction: np.ndarray, entropy: np.ndarray) -> None:
            truth = np.asarray(Image.open(dataset.masks[index]))
            sample = samples.setdefault(index, {"image": read_rgb(dataset.images[index]), "truth": truth})
            sample[name] = {"prediction": prediction, "entropy": entropy}

        return keep

    def run_scoring(net, net_config: dict, name: str) -> dict:
        if net_config.get("tiling"):  # whole images, tiled as deployment tiles them
            return score_images(net, dataset, net_config, device, tiled_keeper(name), cfg.num_pictures)
        return score(net, loader, len(labels), device, keep=keeper(name))

    scores = run_scoring(model, config, "model")
    per_class = {name: {"dice": scores["dice"][i], "iou": scores["iou"][i]} for i, name in enumerate(labels)}
    metrics = {
        "mDice": scores["mDice"],
        "mIoU": scores["mIoU"],
        "pixel_accuracy": scores["pixel_accuracy"],
        "per_class": per_class,
        "labels": labels,
        "confusion_matrix": scores["confusion_matrix"],
        "subset": cfg.subset,
        "images": len(dataset),
        "pixels": scores["pixels"],
        "model": {"architecture": config["architecture"], "source": str(cfg.model), "tiling": config.get("tiling")},
        "dataset_fingerprint": manifest["fingerprint"],
    }
    # The headline figures, the same names in MLflow and KFP: mDice, mIoU, pixel accuracy, Dice per class.
    metrics["metrics"] = {
        "mDice": scores["mDice"],
        "mIoU": scores["mIoU"],
        "pixel_accuracy": scores["pixel_accuracy"],
        **{f"dice_{name}": v["dice"] for name, v in per_class.items() if v["dice"] is not None},
    }
    if baseline is not None:
        base = run_scoring(baseline, baseline_config, "baseline")
        metrics["baseline"] = {"source": str(cfg.baseline), "mDice": base["mDice"], "mIoU": base["mIoU"]}
        metrics["metrics"] |= {"baseline_mDice": base["mDice"], "baseline_mIoU": base["mIoU"]}
    (out_dir / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    confusion_heatmap(scores["confusion_matrix"], labels, out_dir / "confusion_matrix.png")
    rows = [samples[i] for i in sorted(samples)]
    if rows:
        pictures = [(r["image"], r["truth"], r["model"]["prediction"]) for r in rows]
        overlay_grid(pictures, len(labels), out_dir / "predictions.png")
    if rows and baseline is not None:
        comparison_grid(rows, len(labels), out_dir / "comparison.png")
    (out_dir / "report.md").write_text(render_markdown(metrics, has_pictures=bool(rows)))
    metrics["output"] = str(cfg.out)
    return metrics


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.2f}"


def render_markdown(metrics: dict, has_pictures: bool = True, embed_dir: Path | None = None) -> str:
    """The evaluation as Markdown; ``embed_dir`` inlines its PNGs (for the KFP UI)."""
    lines = [
        "# Evaluation",
        "",
        f"- Model: `{metrics['model']['architecture']}` from `{metrics['model']['source']}`",
        f"- Data: subset `{metrics['subset']}`, {metrics['images']} images, "
        f"fingerprint `{metrics['dataset_fingerprint'][:16]}`",
        f"- **mDice {_fmt(metrics['mDice'])}**, mIoU {_fmt(metrics['mIoU'])}, "
        f"pixel accuracy {_fmt(metrics['pixel_accuracy'])} (percent)",
        *(
            [
                f"- Baseline `{metrics['baseline']['source']}`: mDice {_fmt(metrics['baseline']['mDice'])}, "
                f"mIoU {_fmt(metrics['baseline']['mIoU'])}"
            ]
            if "baseline" in metrics
            else []
        ),
        "",
        "| class | Dice % | IoU % |",
        "|---|---|---|",
    ]
    lines += [f"| {name} | {_fmt(v['dice'])} | {_fmt(v['iou'])} |" for name, v in metrics["per_class"].items()]
    pictures = [("confusion matrix", "confusion_matrix.png")]
    if has_pictures:
        pictures.append(("image | ground truth | prediction", "predictions.png"))
    if has_pictures and "baseline" in metrics:
        pictures.append(
            ("image | truth | baseline: prediction, entropy | model: prediction, entropy", "comparison.png")
        )
    for title, name in pictures:
        if embed_dir is not None:
            import base64

            data = base64.b64encode((embed_dir / name).read_bytes()).decode()
            lines += ["", f"![{title}](data:image/png;base64,{data})"]
        else:
            lines += ["", f"![{title}]({name})"]
    return "\n".join(lines) + "\n"
