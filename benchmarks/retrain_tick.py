"""How long a retraining tick takes when no new data has landed, beside one that trains.

    .venv/bin/python benchmarks/retrain_tick.py [--images 24] [--size 64] [--epochs 3] [--repeats 3]

pipelines/retrain.py with kfp.local, MLflow on SQLite in a temporary $SEGFLOW_HOME: the first tick
trains and crowns a champion; then --repeats ticks on the same data, which only fingerprint the
data, find it is the champion's, record "no new data" and end. Wall-clock seconds of each.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=24)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="segflow-tick-") as tmp:
        os.environ["SEGFLOW_HOME"] = str(Path(tmp) / "home")
        os.environ.pop("MLFLOW_TRACKING_URI", None)
        from segflow.data.synth import synthesize
        from segflow_kfp import orchestration

        data = synthesize(Path(tmp) / "landing", "target", args.images, args.size, seed=11)
        params = {"data_uri": str(data), "registered_model": "bench", "epochs": args.epochs, "input_size": args.size}
        pipeline = Path(__file__).resolve().parents[1] / "pipelines" / "retrain.py"
        start = time.monotonic()
        first = orchestration.run_local(pipeline, params)
        trained = time.monotonic() - start
        same = []
        for _ in range(args.repeats):
            start = time.monotonic()
            tick = orchestration.run_local(pipeline, params)
            same.append(time.monotonic() - start)
            assert "train-model" not in tick["tasks"], "the same data must not train"
    print(f"retrain ticks, {args.images} images of {args.size} px, kfp.local, MLflow on SQLite")
    print(f"  new data (trains, {len(first['tasks'])} tasks):      {trained:6.1f} s")
    print(f"  no new data (median of {args.repeats}, {len(tick['tasks'])} tasks): {statistics.median(same):6.1f} s")
    print(f"  each no-new-data tick: {' '.join(f'{s:.1f}' for s in same)} s")
    times = ", ".join(f"{name} {task['seconds']:.1f} s" for name, task in tick["tasks"].items())
    print(f"  task time of one no-new-data tick: {times}")


if __name__ == "__main__":
    main()
