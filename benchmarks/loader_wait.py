"""How long training waits for its batches, with and without loader worker processes, in one run.

    .venv/bin/python benchmarks/loader_wait.py [--size 256] [--images 48] [--steps 12] [--workers 0 2]
        [--threads 2] [--data DATASET]

Trains the same model for the same steps once per worker count (synthetic street scenes drawn at
--size, or an imported --data dataset), and prints seconds per step, the seconds the loop waited
for data (`data_wait_seconds` of the engine's per-epoch record) and their share of the epoch, and
whether the published weights are identical across worker counts (they must be: augmentation
draws from the seed, the epoch and the item, not from the process).
"""

from __future__ import annotations

import argparse
import logging
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file

from segflow.data.importer import ImportConfig
from segflow.data.synth import synthesize
from segflow.stages import import_stage, train_stage
from segflow.train.config import TrainConfig


def measure(size: int, images: int, steps: int, batch: int, workers: list[int], data: Path | None = None):
    """[(workers, the epoch's record)] of one epoch per worker count, and whether the weights agree."""
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        if data is None:
            raw = synthesize(work / "raw", "source", images, size, seed=0)
            data = work / "data"
            import_stage(ImportConfig(str(raw), str(data)), track=False)
        rows, weights = [], []
        for count in workers:
            out = work / f"model-{count}"
            cfg = TrainConfig(
                data=str(data),
                out=str(out),
                epochs=1,
                iters_per_epoch=steps,
                batch_size=batch,
                input_size=size,
                loader_workers=count,
            )
            rows.append((count, train_stage(cfg, track=False).record["history"][0]))
            weights.append(load_file(str(out / "model.safetensors")))
    same = all(all(torch.equal(w[k], weights[0][k]) for k in w) for w in weights[1:])
    return rows, same


def print_rows(rows: list, same: bool, steps: int) -> None:
    print(f"{'loader workers':>15s} {'s / step':>9s} {'waited s':>9s} {'share':>7s}")
    for workers, record in rows:
        share = record["data_wait_share"]  # of the steps' time, without validation; 0 when never waited
        loop = record["data_wait_seconds"] / share if share else float("nan")
        print(
            f"{workers:15d} {loop / steps:9.3f} {record['data_wait_seconds']:9.2f} "
            f"{100 * record['data_wait_share']:6.1f}%"
        )
    print(f"identical weights across worker counts: {same}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=256, help="image and input size (px)")
    parser.add_argument("--images", type=int, default=48)
    parser.add_argument("--steps", type=int, default=12, help="training steps (one epoch)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--data", type=Path, help="an imported dataset (default: synthetic street scenes)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(args.threads)
    rows, same = measure(args.size, args.images, args.steps, args.batch_size, args.workers, args.data)
    print(f"lite_hrnet_s, {args.size} px, batch {args.batch_size}, {args.steps} steps, {args.threads} threads")
    print_rows(rows, same, args.steps)


if __name__ == "__main__":
    main()
