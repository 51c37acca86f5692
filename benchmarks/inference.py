"""Inference speed at 512x512: the reference's eager PyTorch beside segflow's, PyTorch eager vs
OpenVINO FP32 / FP16 / INT8 (every INT8 scheme), per model, same run; where the time goes
(OpenVINO's per-layer counters); what each INT8 scheme does to mDice on a trained model.

    .venv/bin/python benchmarks/inference.py [--models lite_hrnet_s lite_hrnet_18 lite_hrnet_x]
        [--size 512] [--threads 2] [--runs 20] [--rounds 3] [--skip-accuracy]
        [--reference-python ~/otxvenv/bin/python]

- Reference: OTX 2.6's Lite-HRNet in its own Python, and segflow's, under one protocol
  (benchmarks/protocol.py: batch 1, no grad, median of 5 after 2 warm-ups), alternating
  processes over --rounds. Without a reference environment the column says "missing".

- Latency: batch 1, one request at a time (OpenVINO: LATENCY hint). Median of --runs.
- Throughput: 32 images (PyTorch: batches of 8; OpenVINO: THROUGHPUT hint and an
  AsyncInferQueue).
- OpenVINO runs with INFERENCE_PRECISION_HINT f32 for FP32/FP16 IRs, as segflow does, so
  results match PyTorch. This CPU has AMX; OpenVINO's default there would run in bf16.
- Speed uses untrained weights (speed does not depend on them). INT8 calibration uses 32
  synthetic 512 px scenes.
- Accuracy (unless --skip-accuracy): lite_hrnet_s is trained for a few minutes on 128 px
  synthetic scenes, exported to FP32 and INT8 (calibrated on its train images), and both are
  scored on its val subset.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch


def torch_speed(model, size: int, runs: int) -> tuple[float, float]:
    x1 = torch.randn(1, 3, size, size)
    x8 = torch.randn(8, 3, size, size)
    with torch.no_grad():
        model(x1)
        times = []
        for _ in range(runs):
            start = time.perf_counter()
            model(x1)
            times.append(time.perf_counter() - start)
        start = time.perf_counter()
        for _ in range(4):
            model(x8)
        throughput = 32 / (time.perf_counter() - start)
    return 1000 * statistics.median(times), throughput


def ir_precision(ir_dir: Path) -> str:
    import openvino as ov

    return json.loads(ov.Core().read_model(ir_dir / "model.xml").get_rt_info(["model_info", "precision"]).astype(str))


def ov_config(ir_dir: Path, threads: int) -> dict:
    """What segflow's IR runtime sets: f32 execution for FP32/FP16 IRs, the plugin's choice for INT8."""
    from segflow.export.speed import compile_properties

    return compile_properties(ir_precision(ir_dir), threads)


def ov_speed(ir_dir: Path, size: int, runs: int, threads: int) -> tuple[float, float]:
    import openvino as ov

    from segflow.export.speed import measure

    model = ov.Core().read_model(ir_dir / "model.xml")
    speed = measure(model, size, ir_precision(ir_dir), runs=runs, threads=threads)
    return speed.latency_ms, speed.throughput


def profile(ir_dir: Path, size: int, threads: int, runs: int = 10) -> dict[str, float]:
    """Milliseconds per inference by OpenVINO layer type (PERF_COUNT), summed over layers."""
    import openvino as ov

    core = ov.Core()
    compiled = core.compile_model(
        core.read_model(ir_dir / "model.xml"),
        "CPU",
        {"PERF_COUNT": True, "PERFORMANCE_HINT": "LATENCY", **ov_config(ir_dir, threads)},
    )
    request = compiled.create_infer_request()
    x = np.random.default_rng(0).standard_normal((1, 3, size, size)).astype(np.float32)
    request.infer({0: x})
    totals: dict[str, float] = defaultdict(float)
    for _ in range(runs):
        request.infer({0: x})
        for info in request.profiling_info:
            if info.status == info.Status.EXECUTED:
                kind = info.node_type + (" (int8)" if "I8" in info.exec_type.upper() else "")
                totals[kind] += info.real_time.total_seconds() * 1000 / runs
    return dict(totals)


def reference_latency(names: list[str], rounds: int, threads: int, explicit: str) -> dict[str, tuple]:
    """(reference ms, segflow ms) per model, eager, under benchmarks/protocol.py, alternating
    processes; None for the reference when it has no environment."""
    from train_throughput import reference_python

    ref = reference_python(explicit)
    here = Path(__file__).resolve().parent
    out = {}
    for name in names:
        ours, theirs = [], []
        for _ in range(rounds):
            if ref:
                theirs.append(_value([ref, str(here / "otx_reference.py"), "--model", name, "--task", "infer"]))
            ours.append(_value([sys.executable, __file__, "--protocol", name, "--threads", str(threads)]))
        out[name] = (statistics.median(theirs) if theirs else None, statistics.median(ours))
    return out


def _value(command: list[str]) -> float:
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])["value"]


def write_untrained(name: str, folder: Path, size: int) -> None:
    from segflow.data.synth import CLASSES
    from segflow.models import artifact, create_model

    model = create_model(name, len(CLASSES))
    config = artifact.model_config(model, list(CLASSES), size, {"mean": [128.0] * 3, "std": [64.0] * 3})
    artifact.save(folder, model, config)


def calibration_data(root: Path, size: int) -> Path:
    from segflow.data.importer import ImportConfig
    from segflow.data.synth import synthesize
    from segflow.stages import import_stage

    raw = synthesize(root / "calib_raw", "target", 32, size, seed=5)
    import_stage(ImportConfig(str(raw), str(root / "calib")), track=False)
    return root / "calib"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["lite_hrnet_s", "lite_hrnet_18", "lite_hrnet_x"])
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--skip-accuracy", action="store_true")
    parser.add_argument("--reference-python", default="")
    parser.add_argument("--protocol", help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    if args.protocol:
        from train_throughput import segflow_protocol

        print(json.dumps({"value": segflow_protocol(args.protocol, "infer")}))
        return

    from segflow.export.openvino_ir import DEFAULT_INT8_SCHEME, INT8_SCHEMES, ExportConfig
    from segflow.models import artifact
    from segflow.stages import export_stage

    print(f"eager PyTorch at 512x512, batch 1, {args.threads} threads, median of {args.rounds} alternating processes")
    print(f"{'model':15s} {'reference ms':>12s} {'segflow ms':>10s} {'speed-up':>8s}")
    for name, (theirs, ours) in reference_latency(
        args.models, args.rounds, args.threads, args.reference_python
    ).items():
        ratio = f"{theirs / ours:8.2f}" if theirs else f"{'missing':>8s}"
        print(f"{name:15s} {(f'{theirs:12.1f}' if theirs else f'{chr(32) * 5}missing')} {ours:10.1f} {ratio}")
    print()

    rows, profiles = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        calib = calibration_data(tmp, args.size)
        for name in args.models:
            model_dir = tmp / name
            write_untrained(name, model_dir, args.size)
            model, _ = artifact.load(model_dir)
            eager = torch_speed(model, args.size, args.runs)
            rows.append((name, "pytorch eager fp32", *eager, eager))
            variants = [("fp32", ""), ("fp16", ""), *(("int8", scheme) for scheme in INT8_SCHEMES)]
            for precision, scheme in variants:
                ir = tmp / f"{name}-{precision}-{scheme}"
                # Parity is checked by the tests and the accuracy part below; untrained weights here.
                export_stage(
                    ExportConfig(
                        model=str(model_dir),
                        out=str(ir),
                        precision=precision,
                        calibration=str(calib) if precision == "int8" else "",
                        parity_images=0,
                        calibration_images=32,
                        max_drop=100.0,
                        int8_scheme=scheme or DEFAULT_INT8_SCHEME,
                    ),
                    track=False,
                )
                label = f"openvino {precision}" + (f" {scheme}" if scheme else "")
                rows.append((name, label, *ov_speed(ir, args.size, args.runs, args.threads), eager))
                if name == args.models[0] and (precision == "fp32" or scheme in ("all", DEFAULT_INT8_SCHEME)):
                    profiles[label] = profile(ir, args.size, args.threads)

        print(
            f"{args.size}x{args.size}, {args.threads} threads, latency = median of {args.runs} single images, "
            "throughput over 32 images"
        )
        print(
            f"{'model':15s} {'runtime':30s} {'latency ms':>10s} {'x eager':>8s} {'img/s':>7s} {'x eager':>8s} "
            f"{'img/s x fp32 IR':>15s}"
        )
        fp32 = {name: throughput for name, runtime, _, throughput, _ in rows if runtime == "openvino fp32"}
        for name, runtime, latency, throughput, (eager_latency, eager_throughput) in rows:
            print(
                f"{name:15s} {runtime:30s} {latency:10.1f} {eager_latency / latency:8.2f} {throughput:7.1f} "
                f"{throughput / eager_throughput:8.2f} {throughput / fp32[name]:15.2f}"
            )
        print(
            f"\nwhere the time goes, {args.models[0]}, ms per image by OpenVINO layer type (PERF_COUNT, latency mode)"
        )
        kinds = sorted(
            {k for p in profiles.values() for k in p}, key=lambda k: -max(p.get(k, 0) for p in profiles.values())
        )
        print(f"{'layer type':28s} " + " ".join(f"{label[9:]:>22s}" for label in profiles))
        for kind in kinds[:14]:
            print(f"{kind:28s} " + " ".join(f"{p.get(kind, 0.0):22.2f}" for p in profiles.values()))
        print(f"{'total':28s} " + " ".join(f"{sum(p.values()):22.2f}" for p in profiles.values()))

        if not args.skip_accuracy:
            accuracy(tmp)


def accuracy(tmp: Path) -> None:
    from segflow.data.importer import ImportConfig
    from segflow.data.synth import synthesize
    from segflow.export.openvino_ir import ExportConfig
    from segflow.stages import export_stage, import_stage, train_stage
    from segflow.train.config import TrainConfig

    raw = synthesize(tmp / "acc_raw", "target", 96, 128, seed=9)
    import_stage(ImportConfig(str(raw), str(tmp / "acc")), track=False)
    train_stage(
        TrainConfig(
            data=str(tmp / "acc"),
            out=str(tmp / "acc_model"),
            input_size=128,
            epochs=25,
            iters_per_epoch=10,
            early_stop_patience=100,
        ),
        track=False,
    )
    from segflow.export.openvino_ir import INT8_SCHEMES

    print("\nINT8 accuracy, lite_hrnet_s trained on 128 px synthetic target scenes, scored on its val subset")
    for precision, scheme in [("fp32", "convs-fp32-head"), *(("int8", s) for s in INT8_SCHEMES)]:
        report = export_stage(
            ExportConfig(
                model=str(tmp / "acc_model"),
                out=str(tmp / f"acc_{precision}_{scheme}"),
                precision=precision,
                calibration=str(tmp / "acc"),
                max_drop=100.0,
                int8_scheme=scheme,
            ),
            track=False,
        )
        label = precision + (f" {scheme}" if precision == "int8" else "")
        print(
            f"  {label:22s}: PyTorch mDice {100 * report.torch_mDice:.2f}, IR mDice {100 * report.ir_mDice:.2f}"
            f" (change {-report.record['mDice_drop_points']:+.2f} points), argmax agreement "
            f"{100 * report.record['argmax_agreement']:.2f}%"
        )


if __name__ == "__main__":
    main()
