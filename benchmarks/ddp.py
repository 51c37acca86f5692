"""Several processes per training task: 2 processes (gloo, DDP) against 1, same run, same global batch.

    .venv/bin/python benchmarks/ddp.py [--images 64] [--size 128] [--rounds 3] [--iters 12]

What `--gpus 2` runs in a pod, on CPU processes: the train stage through ``run_stage`` with
processes=1 (batch B, all cores) and processes=2 (batch B/2 each, half the cores each), in alternating
rounds. Reports images/s of the training loop (the stage's own train_seconds, so start-up and import
are left out), the speed-up, and each run's val mDice, since more processes must not cost quality.
On a 2-core CPU machine the two processes share the same cores, so read the ratio as the cost of
DDP's gradient all-reduce, not as what N GPUs give.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path

from segflow.data.importer import ImportConfig
from segflow.data.synth import synthesize
from segflow.launch import run_stage
from segflow.stages import import_stage
from segflow.train.config import TrainConfig


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--batch", type=int, default=8, help="global batch: per process, batch / processes")
    parser.add_argument("--iters", type=int, default=12, help="steps per epoch")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        synthesize(root / "raw", "target", args.images, args.size, seed=7)
        import_stage(ImportConfig(str(root / "raw"), str(root / "ds"), val_fraction=0.25), track=False)
        speed: dict[int, list[float]] = {1: [], 2: []}
        quality: dict[int, list[float]] = {1: [], 2: []}
        for r in range(args.rounds):
            for processes in (1, 2):
                cfg = TrainConfig(
                    data=str(root / "ds"),
                    out=str(root / f"m{processes}-{r}"),
                    checkpoint_dir=str(root / f"c{processes}-{r}"),
                    input_size=args.size,
                    batch_size=args.batch // processes,
                    epochs=args.epochs,
                    iters_per_epoch=args.iters,
                    early_stop_patience=100,
                )
                result = run_stage("train", cfg, processes=processes, track=False)
                speed[processes].append(args.epochs * args.iters * args.batch / result.metrics["train_seconds"])
                quality[processes].append(result.best_val_mDice)
                print(f"round {r} processes {processes}: {speed[processes][-1]:.2f} img/s", flush=True)
    print(
        f"\ntrain stage, lite_hrnet_s, {args.size} px, global batch {args.batch}, "
        f"{args.epochs} x {args.iters} steps, {args.rounds} rounds, medians"
    )
    print(f"{'processes':>9}  {'img/s':>7}  {'x 1 process':>11}  val mDice per round")
    for processes in (1, 2):
        img_s = statistics.median(speed[processes])
        ratio = img_s / statistics.median(speed[1])
        scores = " ".join(f"{100 * s:.1f}" for s in quality[processes])
        print(f"{processes:>9}  {img_s:7.2f}  {ratio:11.2f}  {scores}")


if __name__ == "__main__":
    main()
