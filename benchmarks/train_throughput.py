"""Train-step throughput per model: the shipped settings beside plain eager fp32, same run.

    .venv/bin/python benchmarks/train_throughput.py [--models lite_hrnet_s lite_hrnet_18 lite_hrnet_x]
                                                    [--size 256] [--batch 8] [--threads 2] [--rounds 3]

Each (model, setting) runs in a fresh subprocess (so peak memory is its own), rounds alternate the
settings, and medians are reported. The step is the engine's own `train_step` (loss, backward,
gradient clipping, Adam), with the Supervised objective.

- eager fp32: plain Adam (per-parameter loop), contiguous tensors, no autocast.
- shipped: what `segflow train` uses on this device: fused Adam; on CUDA also channels-last
  and bf16/fp16 autocast.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time

# OTX 2.6 img/s, measured in an earlier session (issue 13 replaces this with a same-run measurement)
REFERENCE = {"lite_hrnet_s": 15.0, "lite_hrnet_18": 6.2, "lite_hrnet_x": 1.4}


def measure(name: str, setting: str, size: int, batch: int, threads: int, steps: int) -> dict:
    import torch

    from segflow.models import create_model
    from segflow.train.engine import MAIN, Dist, Objective, Part, Recipe, Step, autocast_for, train_step

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    dist = Dist()
    device = dist.device
    model = create_model(name, 7).to(device)
    autocast, scaler = autocast_for("auto" if setting == "shipped" else "off", device)
    part = Part(MAIN, list(model.parameters()), Recipe(optimizer="adam", lr=1e-3, clip_norm=40.0))
    channels_last = False
    if setting == "shipped":
        channels_last = device.type == "cuda"
    else:  # plain Adam: a per-parameter loop instead of the fused kernel
        part.optimizer = torch.optim.Adam(part.params, 1e-3, foreach=False)
    if channels_last:
        model.to(memory_format=torch.channels_last)
    image = torch.randn(batch, 3, size, size, device=device)
    if channels_last:
        image = image.contiguous(memory_format=torch.channels_last)
    batch_dict = {"image": image, "mask": torch.randint(0, 7, (batch, size, size), device=device)}
    objective = Objective()

    def run(i: int) -> None:
        train_step(model, objective, [part], batch_dict, Step(0, i, 0), autocast, scaler, dist)

    for i in range(2):  # warm-up
        run(i)
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for i in range(steps):
        run(i)
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = (time.perf_counter() - start) / steps
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # MiB (Linux reports KiB)
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated() / 2**20
    return {"img_s": batch / seconds, "peak_mib": peak, "device": str(device)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=list(REFERENCE))
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--one", nargs=2, metavar=("MODEL", "SETTING"), help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.one:
        steps = {"lite_hrnet_x": 2}.get(args.one[0], 4)
        print(json.dumps(measure(args.one[0], args.one[1], args.size, args.batch, args.threads, steps)))
        return

    settings = ("eager fp32", "shipped")
    results: dict[tuple[str, str], list[dict]] = {}
    for _ in range(args.rounds):
        for name in args.models:
            for setting in settings:
                out = subprocess.run(
                    [
                        sys.executable,
                        __file__,
                        "--one",
                        name,
                        setting.split()[0] if setting == "shipped" else "eager",
                        "--size",
                        str(args.size),
                        "--batch",
                        str(args.batch),
                        "--threads",
                        str(args.threads),
                    ],
                    capture_output=True,
                    text=True,
                    check=True,
                )
                results.setdefault((name, setting), []).append(json.loads(out.stdout.strip().splitlines()[-1]))

    device = next(iter(results.values()))[0]["device"]
    print(
        f"train step, {args.size}x{args.size}, batch {args.batch}, {args.threads} threads, {device}, "
        f"{args.rounds} rounds, medians"
    )
    print(f"{'model':15s} {'setting':11s} {'img/s':>7s} {'x eager':>8s} {'x OTX ref':>9s} {'peak MiB':>9s}")
    for name in args.models:
        eager = statistics.median(r["img_s"] for r in results[(name, "eager fp32")])
        for setting in settings:
            rows = results[(name, setting)]
            speed = statistics.median(r["img_s"] for r in rows)
            peak = max(r["peak_mib"] for r in rows)
            print(
                f"{name:15s} {setting:11s} {speed:7.2f} {speed / eager:8.2f} {speed / REFERENCE[name]:9.2f} {peak:9.0f}"
            )


if __name__ == "__main__":
    main()
