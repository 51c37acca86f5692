"""Pseudo-mask throughput: 1 worker vs all cores on the same images, same run.

    .venv/bin/python benchmarks/pseudo_masks.py [--images 96] [--size 256] [--rounds 3]

Felzenszwalb with the OTX parameters (scale 1000, sigma 0.8, min size 1000). Each measurement
writes into a fresh folder, so nothing is reused. Parallel efficiency = speed-up / cores.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

from segflow.data.synth import synthesize
from segflow.selfsl.pseudo_masks import make_pseudo_masks


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=96)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    cores = len(os.sched_getaffinity(0))
    with tempfile.TemporaryDirectory() as tmp:
        images = synthesize(Path(tmp) / "images", "target", args.images, args.size, seed=0, unlabeled=True)
        times: dict[int, list[float]] = {1: [], cores: []}
        for r in range(args.rounds):
            for workers in times:
                out = Path(tmp) / f"masks-{workers}-{r}"
                start = time.perf_counter()
                make_pseudo_masks(images, out, workers=workers)
                times[workers].append(time.perf_counter() - start)
                shutil.rmtree(out)
    one, many = statistics.median(times[1]), statistics.median(times[cores])
    print(f"{args.images} images of {args.size}x{args.size}, {args.rounds} rounds, medians")
    print(f"1 worker:      {one:6.2f} s  {args.images / one:7.1f} images/s")
    print(f"{cores} workers:     {many:6.2f} s  {args.images / many:7.1f} images/s")
    print(f"speed-up {one / many:.2f}x on {cores} cores, parallel efficiency {one / many / cores:.2f}")


if __name__ == "__main__":
    main()
