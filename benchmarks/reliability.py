"""Two costs of reliability, measured on this machine:

1. How long a command waits on an S3 endpoint that accepts connections and never answers, with
   segflow's default timeouts and retries (what a user sees before the error).
2. What verifying every file of a dataset against its manifest's sha256 costs, next to decoding
   the same files (which every training epoch does anyway), as a ratio.
3. How long a diverging run (``--lr 1e30``) takes to stop with its error, next to one epoch of
   the same run at a sane learning rate.
4. What checking every weight for NaN / inf on publish costs, next to writing the weights
   (safetensors), for each model of the family.

    .venv/bin/python benchmarks/reliability.py [--images 256] [--size 256] [--rounds 3] [--skip-silent]
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
from PIL import Image


def silent_endpoint_seconds() -> tuple[float, str]:
    """Run `segflow data import s3://...` against a socket that never answers; time until exit."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(64)
    held: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        server.settimeout(0.2)
        while not stop.is_set():
            try:
                held.append(server.accept()[0])
            except OSError:
                continue

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    env = {
        **os.environ,
        "AWS_ENDPOINT_URL": f"http://127.0.0.1:{server.getsockname()[1]}",
        "AWS_ACCESS_KEY_ID": "x",
        "AWS_SECRET_ACCESS_KEY": "y",
        "AWS_DEFAULT_REGION": "us-east-1",
    }
    for name in ("SEGFLOW_S3_READ_TIMEOUT", "SEGFLOW_S3_CONNECT_TIMEOUT", "AWS_MAX_ATTEMPTS", "AWS_RETRY_MODE"):
        env.pop(name, None)  # the defaults are what is measured
    with tempfile.TemporaryDirectory() as tmp:
        start = time.monotonic()
        result = subprocess.run(
            [sys.executable, "-m", "segflow.cli", "data", "import", "s3://bucket/raw", f"{tmp}/out", "--no-track"],
            capture_output=True,
            text=True,
            env=env,
            timeout=900,
        )
        seconds = time.monotonic() - start
    stop.set()
    thread.join()
    for conn in held:
        conn.close()
    server.close()
    last = result.stderr.strip().splitlines()[-1] if result.stderr.strip() else ""
    return seconds, f"exit {result.returncode}: {last[:160]}"


def verify_vs_decode(images: int, size: int, rounds: int) -> list[tuple[float, float]]:
    from segflow.data import manifest as manifest_lib
    from segflow.data.importer import ImportConfig
    from segflow.data.synth import synthesize
    from segflow.stages import import_stage

    results = []
    with tempfile.TemporaryDirectory() as tmp:
        raw = synthesize(Path(tmp) / "raw", "target", num_images=images, size=size, seed=0)
        import_stage(ImportConfig(str(raw), f"{tmp}/ds"), track=False)
        manifest = manifest_lib.read(f"{tmp}/ds")
        files = [Path(tmp) / "ds" / rel for rel in manifest["files"]]
        for _ in range(rounds):
            start = time.perf_counter()
            manifest_lib.verify_files(Path(tmp) / "ds", manifest["files"])
            verify = time.perf_counter() - start
            start = time.perf_counter()
            for path in files:  # what the training datasets do per image and mask
                with Image.open(path) as img:
                    np.asarray(img)
            decode = time.perf_counter() - start
            results.append((verify, decode))
    return results


def divergence_seconds(rounds: int) -> tuple[float, float, str]:
    """(seconds until a --lr 1e30 run stops, seconds of one sane epoch, the error): in-process,
    48 labelled 64 px scenes, batch 4, 12 steps an epoch, so that start-up is not measured."""
    from segflow.data.importer import ImportConfig
    from segflow.data.synth import synthesize
    from segflow.errors import SegflowError
    from segflow.stages import import_stage, train_stage
    from segflow.train.config import TrainConfig

    diverged, sane, message = [], [], ""
    with tempfile.TemporaryDirectory() as tmp:
        raw = synthesize(Path(tmp) / "raw", "target", num_images=48, size=64, seed=0)
        import_stage(ImportConfig(str(raw), f"{tmp}/ds"), track=False)
        settings = {"data": f"{tmp}/ds", "input_size": 64, "batch_size": 4, "epochs": 1, "early_stop_patience": 0}
        for i in range(rounds):
            start = time.perf_counter()
            try:
                train_stage(TrainConfig(out=f"{tmp}/bad{i}", lr=1e30, **settings), track=False)
            except SegflowError as exc:
                message = str(exc).split(":")[0]
            diverged.append(time.perf_counter() - start)
            start = time.perf_counter()
            train_stage(TrainConfig(out=f"{tmp}/good{i}", **settings), track=False)
            sane.append(time.perf_counter() - start)
    return statistics.median(diverged), statistics.median(sane), message


def finite_check_costs(rounds: int) -> list[tuple[str, float, float]]:
    """Per model: (name, seconds of the NaN/inf check, seconds of writing the weights), medians."""
    from segflow.models import MODEL_NAMES, create_model
    from segflow.models.artifact import check_finite, save_weights

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in MODEL_NAMES:
            state = {k: v.detach().cpu().contiguous() for k, v in create_model(name, 8).state_dict().items()}
            checks, writes = [], []
            for _ in range(max(rounds, 5)):
                start = time.perf_counter()
                check_finite(state, name)
                checks.append(time.perf_counter() - start)
                start = time.perf_counter()
                save_weights(Path(tmp) / f"{name}.safetensors", state, "bench")  # the check included
                writes.append(time.perf_counter() - start)
            rows.append((name, statistics.median(checks), statistics.median(writes)))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--skip-silent", action="store_true")
    parser.add_argument("--skip-datasets", action="store_true")
    args = parser.parse_args()

    stop, epoch, message = divergence_seconds(args.rounds)
    print(f"a diverging run (--lr 1e30) stopped after {stop:.2f} s ({message}); one sane epoch of the same run "
          f"took {epoch:.2f} s: {stop / epoch:.2f} epochs")  # fmt: skip
    print("NaN/inf check of every weight on publish, against writing the weights (check included), medians")
    for name, check, write in finite_check_costs(args.rounds):
        print(f"  {name:14s} check {1000 * check:7.2f} ms   write {1000 * write:7.2f} ms   share {check / write:6.1%}")
    if args.skip_datasets:
        return

    rows = verify_vs_decode(args.images, args.size, args.rounds)
    verify = statistics.median(v for v, _ in rows)
    decode = statistics.median(d for _, d in rows)
    print(f"dataset of {args.images} images + masks at {args.size}x{args.size}, {args.rounds} rounds, medians")
    print(f"  sha256 of every file against the manifest: {verify:7.3f} s")
    print(f"  decoding every file once (PIL):            {decode:7.3f} s")
    print(f"  verification / decoding:                   {verify / decode:7.3f}")
    if not args.skip_silent:
        seconds, outcome = silent_endpoint_seconds()
        print(f"silent S3 endpoint, default timeouts: the command ended after {seconds:.1f} s ({outcome})")


if __name__ == "__main__":
    main()
