"""Train-step throughput per model, segflow beside the reference (OTX 2.6), same run.

    .venv/bin/python benchmarks/train_throughput.py [--models lite_hrnet_s lite_hrnet_18 lite_hrnet_x]
        [--rounds 3] [--threads 2] [--reference-python ~/otxvenv/bin/python]

Every measurement is its own process; rounds alternate the processes (reference, segflow,
segflow's engine), and medians are reported.

- **reference** and **segflow**: the same protocol (benchmarks/protocol.py): torch Adam with its
  defaults, cross-entropy, 256 px, batch 8, 2 warm-up and 5 timed steps. The reference is OTX
  2.6's LiteHRNetBackbone + FCNHead, run by its own Python (OTX needs torch 2.14; segflow pins
  2.13). Both compute the same function (tests/test_otx.py).
- **engine shipped**: segflow's own `train_step` (fused Adam, gradient clipping at norm 40), as
  `segflow train` runs it.

Then (unless --no-profile) where segflow's step spends its time (torch.profiler, by op), and the
step's convolution arithmetic as a fraction of what this machine's convolutions reach at best (a
dense 3x3 convolution, forward and backward, measured in the same process).

Without a reference environment (--reference-python, $SEGFLOW_REFERENCE_PYTHON, or
~/otxvenv/bin/python) the reference column says "missing": no stale figures stand in for it.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
MODELS = ["lite_hrnet_s", "lite_hrnet_18", "lite_hrnet_x"]


def reference_python(explicit: str = "") -> str | None:
    """The reference environment's Python, when one exists and imports OTX."""
    for candidate in (
        explicit,
        os.environ.get("SEGFLOW_REFERENCE_PYTHON", ""),
        str(Path.home() / "otxvenv/bin/python"),
    ):
        if candidate and Path(candidate).expanduser().exists():
            python = str(Path(candidate).expanduser())
            ok = subprocess.run([python, "-c", "import otx"], capture_output=True).returncode == 0
            if ok:
                return python
    return None


def segflow_protocol(name: str, task: str) -> float:
    """segflow's side of benchmarks/protocol.py."""
    sys.path.insert(0, str(HERE))
    import protocol

    from segflow.models import create_model

    model = create_model(name, 3)
    if task == "train":
        return protocol.train_img_s(lambda x: model(x).logits, model.train().parameters())
    return protocol.infer_ms(lambda x: model(x).logits, 512)


def engine_shipped(name: str, size: int = 256, batch: int = 8, steps: int = 5, amp: str = "auto") -> float:
    """The engine's own train step (fused Adam, clipping), with the supervised objective, on this
    process's device (a GPU when there is one); images per second."""
    import torch

    from segflow.models import create_model
    from segflow.train.distributed import Dist, autocast_for
    from segflow.train.loop import train_step
    from segflow.train.objective import MAIN, Objective, Part, Recipe, Step

    torch.manual_seed(0)
    dist = Dist().start()
    model = create_model(name, 3).to(dist.device)
    autocast, scaler = autocast_for(amp, dist.device)
    part = Part(MAIN, list(model.parameters()), Recipe(optimizer="adam", lr=1e-3, clip_norm=40.0))
    data = {
        "image": torch.randn(batch, 3, size, size, device=dist.device),
        "mask": torch.randint(0, 3, (batch, size, size), device=dist.device),
    }
    objective = Objective()
    for i in range(2 + steps):
        if i == 2:
            synchronize(dist.device)
            start = time.perf_counter()
        train_step(model, objective, [part], data, Step(0, i, 0), autocast, scaler, dist)
    synchronize(dist.device)
    return steps * batch / (time.perf_counter() - start)


def synchronize(device) -> None:
    """Wait for the device's queued work, so that a clock reading means it is done."""
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def conv_gflops(threads: int, steps: int = 5) -> float:
    """What this machine's convolutions reach: a dense 3x3, 64 -> 64 channels, 64x64, batch 8,
    forward + backward (3x the forward's multiply-adds), GFLOP/s."""
    import torch

    torch.set_num_threads(threads)
    conv = torch.nn.Conv2d(64, 64, 3, padding=1, bias=False)
    x = torch.randn(8, 64, 64, 64, requires_grad=True)
    flops = 2 * 3 * 8 * 64 * 64 * 64 * 64 * 9
    for i in range(2 + steps):
        if i == 2:
            start = time.perf_counter()
        conv(x).sum().backward()
    return flops * steps / (time.perf_counter() - start) / 1e9


def profile_step(name: str, threads: int) -> None:
    """torch.profiler's view of segflow's protocol step, by op (self CPU time), and its convolution
    arithmetic against the machine's best."""
    import torch
    from torch.profiler import ProfilerActivity, profile
    from torch.utils.flop_counter import FlopCounterMode

    from segflow.models import create_model

    torch.set_num_threads(threads)
    model = create_model(name, 3).train()
    optimizer = torch.optim.Adam(model.parameters(), 1e-3)
    x, target = torch.randn(8, 3, 256, 256), torch.randint(0, 3, (8, 256, 256))

    def step() -> None:
        torch.nn.functional.cross_entropy(model(x).logits, target).backward()
        optimizer.step()
        optimizer.zero_grad()

    with FlopCounterMode(display=False) as counter:  # forward and backward of one step
        step()
    step()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        start = time.perf_counter()
        for _ in range(3):
            step()
        seconds = (time.perf_counter() - start) / 3
    rows = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)
    total = sum(e.self_cpu_time_total for e in rows)
    print(f"\n{name}: where one protocol step's time goes (torch.profiler, self CPU time, 3 steps)")
    for event in rows[:12]:
        print(f"  {event.key:42s} {100 * event.self_cpu_time_total / total:5.1f} %  {event.count // 3:6d} calls/step")
    achieved = counter.get_total_flops() / seconds / 1e9
    best = conv_gflops(threads)
    print(
        f"  convolution arithmetic: {counter.get_total_flops() / 1e9:.1f} GFLOP per step in {seconds:.2f} s = "
        f"{achieved:.1f} GFLOP/s; a dense 3x3 convolution here reaches {best:.1f} GFLOP/s: {achieved / best:.2f} of it"
    )


def one(args) -> None:
    import torch

    torch.set_num_threads(args.threads)
    name, setting = args.one
    value = segflow_protocol(name, "train") if setting == "segflow" else engine_shipped(name)
    print(json.dumps({"value": value}))


def run(command: list[str]) -> float:
    out = subprocess.run(command, capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed:\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])["value"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=MODELS)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--reference-python", default="")
    parser.add_argument("--no-profile", action="store_true")
    parser.add_argument("--one", nargs=2, metavar=("MODEL", "SETTING"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        one(args)
        return

    ref = reference_python(args.reference_python)
    threads = ["--threads", str(args.threads)]
    commands = {
        "segflow": lambda n: [sys.executable, __file__, "--one", n, "segflow", *threads],
        "engine shipped": lambda n: [sys.executable, __file__, "--one", n, "engine", *threads],
    }
    if ref:
        commands = {
            "reference": lambda n: [ref, str(HERE / "otx_reference.py"), "--model", n, "--task", "train", *threads],
            **commands,
        }
    results: dict[tuple[str, str], list[float]] = {}
    for _ in range(args.rounds):
        for name in args.models:
            for setting, command in commands.items():
                results.setdefault((name, setting), []).append(run(command(name)))

    print(f"train step, 256x256, batch 8, 3 classes, {args.threads} threads, CPU, {args.rounds} rounds, medians")
    if not ref:
        print("reference: missing (no OTX environment; see --reference-python). Ratios to it are not shown.")
    print(f"{'model':15s} {'setting':15s} {'img/s':>7s} {'x reference':>12s}  rounds")
    for name in args.models:
        base = statistics.median(results[(name, "reference")]) if ref else None
        for setting in commands:
            values = results[(name, setting)]
            speed = statistics.median(values)
            ratio = f"{speed / base:12.2f}" if base else f"{'missing':>12s}"
            print(f"{name:15s} {setting:15s} {speed:7.2f} {ratio}  {' '.join(f'{v:.2f}' for v in values)}")
    if not args.no_profile:
        for name in args.models:
            profile_step(name, args.threads)


if __name__ == "__main__":
    main()
