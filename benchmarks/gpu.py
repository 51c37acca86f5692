"""The GPU figures in one command, for a machine with a CUDA device.

    .venv/bin/python benchmarks/gpu.py [--size 512] [--batch 8] [--steps 10] [--models ...] [--out FILE.json]
    .venv/bin/python benchmarks/gpu.py --dry     # any machine: the same steps on CPU at a tiny size

1. Training throughput (images/s) of each model with the engine's own step (fused Adam, clipping),
   fp32 and AMP bf16, and the peak GPU memory of each.
2. The loader: one epoch of `segflow train` on synthetic scenes with 0 loader workers and with the
   automatic count, the seconds each step waited for data, and whether the weights agree.
3. An adaptation step of each method beside a supervised step (benchmarks/domain_adaptation.py's
   --throughput, on the GPU, bf16).
4. OpenVINO's devices: an FP32 / FP16 IR on OpenVINO's GPU plugin needs an Intel GPU; the script
   says which devices OpenVINO sees.

--dry exists so that the script is checked where no GPU is (it takes about a minute on 2 cores);
its figures mean nothing. Without a CUDA device and without --dry it exits 2 and says so.
Write the figures into benchmarks/RESULTS.md with the command and the device name it prints.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
from pathlib import Path

import torch
from domain_adaptation import METHODS, throughput
from loader_wait import measure, print_rows
from train_throughput import MODELS, engine_shipped

from segflow.parallel import cpu_count
from segflow.train.loop import loader_workers


def training(models: list[str], size: int, batch: int, steps: int, cuda: bool) -> dict:
    rows = {}
    for name in models:
        for amp in ("off", "bf16"):
            if cuda:
                torch.cuda.reset_peak_memory_stats()
            img_s = engine_shipped(name, size, batch, steps, amp=amp)
            peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else math.nan
            rows[f"{name} {amp}"] = {"img_s": img_s, "peak_gib": peak}
            print(f"  {name:14s} amp {amp:5s} {img_s:8.1f} img/s   peak {peak:6.2f} GiB", flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=10, help="timed steps per measurement")
    parser.add_argument("--models", nargs="+", default=MODELS)
    parser.add_argument("--loader-steps", type=int, default=20)
    parser.add_argument("--dry", action="store_true", help="CPU, 64 px, one step: check that the script runs")
    parser.add_argument("--out", type=Path, help="also write the figures as JSON")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    cuda = torch.cuda.is_available()
    if not cuda and not args.dry:
        print("gpu.py: no CUDA device on this machine. Run it where one is, or pass --dry to check the script.")
        sys.exit(2)
    if args.dry:
        args.size, args.batch, args.steps, args.models, args.loader_steps = 64, 2, 1, MODELS[:1], 2
    device = torch.cuda.get_device_name() if cuda else f"CPU ({cpu_count()} cores, dry run)"
    print(f"device: {device}; torch {torch.__version__}; {args.size} px, batch {args.batch}")
    figures: dict = {"device": device, "size": args.size, "batch": args.batch}

    print("\n1. training throughput, the engine's step")
    figures["training"] = training(args.models, args.size, args.batch, args.steps, cuda)

    auto = loader_workers(-1, torch.device("cuda" if cuda else "cpu"))
    print(f"\n2. waiting for data, lite_hrnet_s, {args.loader_steps} steps, loader workers 0 and auto ({auto})")
    counts = sorted({0, auto})
    images = max(2 * args.batch, 16)
    rows, same = measure(args.size, images, args.loader_steps, args.batch, counts)
    print_rows(rows, same, args.loader_steps)
    figures["loader"] = {str(w): r for w, r in rows} | {"identical_weights": same}

    print("\n3. adaptation steps beside a supervised step")
    options = argparse.Namespace(
        size=args.size,
        steps=args.steps,
        threads=torch.get_num_threads(),
        methods=METHODS,
        settings="{}",
        amp="bf16" if cuda else "off",
    )
    figures["adaptation_seconds"] = throughput(options)

    import openvino as ov

    devices = ov.Core().available_devices
    print(f"\n4. OpenVINO devices: {', '.join(devices)}")
    if "GPU" not in devices:
        print("   no OpenVINO GPU device (its GPU plugin drives Intel GPUs): IR inference on GPU not measured")
    figures["openvino_devices"] = devices
    if args.out:
        args.out.write_text(json.dumps(figures, indent=2, default=str) + "\n")


if __name__ == "__main__":
    main()
