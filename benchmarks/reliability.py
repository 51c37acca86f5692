"""Two costs of reliability, measured on this machine:

1. How long a command waits on an S3 endpoint that accepts connections and never answers, with
   segflow's default timeouts and retries (what a user sees before the error).
2. What verifying every file of a dataset against its manifest's sha256 costs, next to decoding
   the same files (which every training epoch does anyway), as a ratio.

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
    from segflow.data.importer import ImportConfig, import_dataset
    from segflow.data.synth import synthesize

    results = []
    with tempfile.TemporaryDirectory() as tmp:
        raw = synthesize(Path(tmp) / "raw", "target", num_images=images, size=size, seed=0)
        import_dataset(ImportConfig(str(raw), f"{tmp}/ds"))
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--skip-silent", action="store_true")
    args = parser.parse_args()

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
