"""Inference speed at 512x512: PyTorch eager vs OpenVINO FP32 / FP16 / INT8, per model, same run,
plus what INT8 does to mDice on a trained model.

    .venv/bin/python benchmarks/inference.py [--models lite_hrnet_s lite_hrnet_18 lite_hrnet_x]
        [--size 512] [--threads 2] [--runs 20] [--skip-accuracy]

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
import statistics
import tempfile
import time
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


def ov_speed(ir_dir: Path, size: int, runs: int, threads: int) -> tuple[float, float]:
    import openvino as ov

    core = ov.Core()
    model = core.read_model(ir_dir / "model.xml")
    common = {"INFERENCE_PRECISION_HINT": "f32", "INFERENCE_NUM_THREADS": threads}
    precision = ov.Core().read_model(ir_dir / "model.xml").get_rt_info(["model_info", "precision"]).astype(str)
    if "int8" in precision:
        common.pop("INFERENCE_PRECISION_HINT")
    latency_model = core.compile_model(model, "CPU", {"PERFORMANCE_HINT": "LATENCY", **common})
    request = latency_model.create_infer_request()
    x = np.random.default_rng(0).standard_normal((1, 3, size, size)).astype(np.float32)
    request.infer({0: x})
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        request.infer({0: x})
        times.append(time.perf_counter() - start)
    throughput_model = core.compile_model(model, "CPU", {"PERFORMANCE_HINT": "THROUGHPUT", **common})
    queue = ov.AsyncInferQueue(throughput_model, 0)
    for _ in range(2):
        queue.start_async({0: x})
    queue.wait_all()
    start = time.perf_counter()
    for _ in range(32):
        queue.start_async({0: x})
    queue.wait_all()
    return 1000 * statistics.median(times), 32 / (time.perf_counter() - start)


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
    parser.add_argument("--skip-accuracy", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from segflow.export.openvino_ir import ExportConfig
    from segflow.models import artifact
    from segflow.stages import export_stage

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        calib = calibration_data(tmp, args.size)
        for name in args.models:
            model_dir = tmp / name
            write_untrained(name, model_dir, args.size)
            model, _ = artifact.load(model_dir)
            eager = torch_speed(model, args.size, args.runs)
            rows.append((name, "pytorch eager fp32", *eager, eager))
            for precision in ("fp32", "fp16", "int8"):
                ir = tmp / f"{name}-{precision}"
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
                    ),
                    track=False,
                )
                rows.append((name, f"openvino {precision}", *ov_speed(ir, args.size, args.runs, args.threads), eager))

        print(
            f"{args.size}x{args.size}, {args.threads} threads, latency = median of {args.runs} single images, "
            "throughput over 32 images"
        )
        print(f"{'model':15s} {'runtime':20s} {'latency ms':>10s} {'x eager':>8s} {'img/s':>7s} {'x eager':>8s}")
        for name, runtime, latency, throughput, (eager_latency, eager_throughput) in rows:
            print(
                f"{name:15s} {runtime:20s} {latency:10.1f} {eager_latency / latency:8.2f} {throughput:7.1f} "
                f"{throughput / eager_throughput:8.2f}"
            )

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
    print("\nINT8 accuracy, lite_hrnet_s trained on 128 px synthetic target scenes, scored on its val subset")
    for precision in ("fp32", "int8"):
        report = export_stage(
            ExportConfig(
                model=str(tmp / "acc_model"),
                out=str(tmp / f"acc_{precision}"),
                precision=precision,
                calibration=str(tmp / "acc"),
                max_drop=100.0,
            ),
            track=False,
        )
        print(
            f"  {precision}: PyTorch mDice {100 * report['torch_mDice']:.2f}, IR mDice {100 * report['ir_mDice']:.2f}"
            f" (change {-report['mDice_drop_points']:+.2f} points), argmax agreement "
            f"{100 * report['argmax_agreement']:.2f}%"
        )


if __name__ == "__main__":
    main()
