"""Import-stage throughput beside a plain PIL decode of the same images, in one process.

    .venv/bin/python benchmarks/import_throughput.py [--images 512] [--size 256] [--rounds 3]

Rounds alternate the three measurements so that machine noise hits them alike; the medians and
their ratio are printed. "cpu/wall" is the CPU time of this process and its workers divided by
wall time: about 2.0 means both cores are busy.
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from segflow.data.importer import ImportConfig
from segflow.data.synth import synthesize
from segflow.stages import import_stage


def cpu_seconds() -> float:
    own = resource.getrusage(resource.RUSAGE_SELF)
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def timed(fn) -> tuple[float, float]:
    cpu, start = cpu_seconds(), time.perf_counter()
    fn()
    wall = time.perf_counter() - start
    return wall, (cpu_seconds() - cpu) / wall


def plain_decode(folder: Path) -> None:
    for path in sorted((folder / "images").iterdir()):
        np.asarray(Image.open(path).convert("RGB"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=512)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        # Half each domain: target images carry noise and texture, so they are the costlier PNGs.
        data = tmp / "data"
        half = args.images // 2
        for domain, count in (("source", half), ("target", args.images - half)):
            part = synthesize(tmp / domain, domain, count, args.size, seed=0)
            (data / "images").mkdir(parents=True, exist_ok=True)
            (data / "masks").mkdir(exist_ok=True)
            for sub in ("images", "masks"):
                for p in (part / sub).iterdir():
                    p.rename(data / sub / p.name)
            (part / "dataset_meta.json").rename(data / "dataset_meta.json")

        def stage(workers: int):
            out = tmp / f"out-{workers}"
            return lambda: import_stage(ImportConfig(str(data), str(out), workers=workers, overwrite=True), track=False)

        runs = {
            "plain PIL decode (1 process)": lambda: plain_decode(data),
            "import stage, 1 worker": stage(1),
            f"import stage, all cores ({len(os.sched_getaffinity(0))})": stage(0),
        }
        stage(0)()  # warm-up: imports, matplotlib font cache, page cache
        results: dict[str, list[tuple[float, float]]] = {name: [] for name in runs}
        for _ in range(args.rounds):
            for name, fn in runs.items():
                results[name].append(timed(fn))

    print(f"{args.images} images of {args.size}x{args.size} px, {args.rounds} rounds, medians")
    print(f"{'':40s} {'seconds':>8s} {'images/s':>9s} {'cpu/wall':>9s} {'x plain':>8s}")
    base = statistics.median(w for w, _ in results["plain PIL decode (1 process)"])
    for name, values in results.items():
        wall = statistics.median(w for w, _ in values)
        util = statistics.median(u for _, u in values)
        print(f"{name:40s} {wall:8.2f} {args.images / wall:9.0f} {util:9.2f} {wall / base:8.2f}")


if __name__ == "__main__":
    main()
