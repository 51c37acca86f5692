"""What a segflow process costs to end, with and without freezing the garbage collector at exit.

    .venv/bin/python benchmarks/process_exit.py [--runs 5]

Each run starts a fresh Python that does what every command and pipeline task does before its
own work (import the stages, open the local SQLite tracking store, log one MLflow run), then
exits; the seconds from its last statement to the end of the process are its exit. The runs
alternate between segflow as shipped (``atexit.register(gc.freeze)`` in ``segflow/__init__.py``)
and the same process with that handler unregistered, so both see the same machine load.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time

CHILD = """
import atexit, gc, sys, time
import mlflow
import segflow.stages
if sys.argv[1] == "collector":
    atexit.unregister(gc.freeze)
mlflow.set_tracking_uri(f"sqlite:///{sys.argv[2]}/mlflow.db")
with mlflow.start_run():
    mlflow.log_metric("x", 1.0)
print(time.time(), flush=True)
"""


def exit_seconds(mode: str, folder: str) -> float:
    done = subprocess.run([sys.executable, "-c", CHILD, mode, folder], capture_output=True, text=True, check=True)
    ended = time.time()
    return ended - float(done.stdout.split()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    seconds: dict[str, list[float]] = {"frozen": [], "collector": []}
    with tempfile.TemporaryDirectory() as folder:
        exit_seconds("frozen", folder)  # the store's tables are created once, outside the timings
        for _ in range(args.runs):
            for mode in seconds:
                seconds[mode].append(exit_seconds(mode, folder))
    for mode, values in seconds.items():
        spread = f"{min(values):.2f}-{max(values):.2f}"
        print(f"{mode:>9}: exit {statistics.median(values):.2f} s (median of {len(values)} runs; {spread})")
    ratio = statistics.median(seconds["collector"]) / statistics.median(seconds["frozen"])
    print(f"exit with the collector's last passes / frozen: {ratio:.1f}x")


if __name__ == "__main__":
    main()
