"""INT8 that pays: each INT8 scheme's speed against the FP32 IR, and its accuracy, per model.

    .venv/bin/python benchmarks/int8.py [--models lite_hrnet_s lite_hrnet_18 lite_hrnet_x] [--size 512]
        [--schemes qat convs-fp32-head all] [--accuracy-models lite_hrnet_s] [--work DIR]
        [--model DIR --data DS ...] [--qat-steps 300] [--qat-lr 3e-4] [--skip-speed]

- Speed: untrained weights (speed does not depend on them) at --size, exported with `segflow export`;
  every export measures its IR and the FP32 IR one after the other in the same process (latency of
  one image, throughput of a queue of 32), so the ratio is what the scheme buys on this CPU. QAT's
  speed comes from its placement, fine-tuning or not, so the speed rows skip the fine-tuning.
- Accuracy: models trained here on 128 px synthetic target scenes (--accuracy-models), and any
  --model/--data pairs (a trained model folder and the dataset artifact it was trained on, e.g.
  CamVid from benchmarks/real_camvid.py), exported with each scheme; the drop is the parity check's
  (PyTorch mDice minus IR mDice on the dataset's val images).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))


def export(model: Path, data: Path, out: Path, scheme: str, args, **extra) -> dict:
    from segflow.export.openvino_ir import ExportConfig
    from segflow.stages import export_stage

    precision = "fp32" if scheme == "fp32" else "int8"
    settings = {"qat_steps": args.qat_steps, "qat_lr": args.qat_lr, **extra}
    cfg = ExportConfig(
        model=str(model),
        out=str(out),
        precision=precision,
        calibration=str(data),
        int8_scheme=scheme if precision == "int8" else "auto",
        max_drop=100.0,  # measure every scheme, pass or fail
        overwrite=True,
        **settings,
    )
    return export_stage(cfg, track=False).record  # the export report, as export_report.json holds it


def speed_rows(work: Path, args) -> None:
    from inference import calibration_data, write_untrained

    calib = calibration_data(work, args.size)
    print(f"\n{args.size}x{args.size}, {torch.get_num_threads()} threads, each IR against the FP32 IR of its model")
    print(f"{'model':15s} {'scheme':18s} {'latency ms':>10s} {'x fp32':>7s} {'img/s':>7s} {'x fp32':>7s}")
    for name in args.models:
        model = work / name
        write_untrained(name, model, args.size)
        for scheme in args.schemes:
            report = export(model, calib, work / f"{name}-{scheme}", scheme, args, parity_images=0, qat_steps=0)
            print(
                f"{name:15s} {scheme:18s} {report['latency_ms']:10.1f} {report['latency_vs_fp32']:7.2f} "
                f"{report['throughput']:7.1f} {report['throughput_vs_fp32']:7.2f}",
                flush=True,
            )


def synthetic_model(work: Path, name: str) -> tuple[Path, Path]:
    from segflow.data.importer import ImportConfig
    from segflow.data.synth import synthesize
    from segflow.stages import import_stage, train_stage
    from segflow.train.config import TrainConfig

    data, model = work / "acc", work / f"acc-{name}"
    if not (data / "manifest.json").exists():
        raw = synthesize(work / "acc_raw", "target", 96, 128, seed=9)
        import_stage(ImportConfig(str(raw), str(data)), track=False)
    if not (model / "config.json").exists():
        cfg = TrainConfig(data=str(data), out=str(model), model=name, input_size=128, epochs=25, iters_per_epoch=10,
                          early_stop_patience=100)  # fmt: skip
        train_stage(cfg, track=False)
    return model, data


def accuracy_rows(pairs: list[tuple[str, Path, Path]], work: Path, args) -> dict:
    print("\nINT8 accuracy: mDice of the IR against PyTorch on the dataset's val images (parity check)")
    print(f"{'model':28s} {'scheme':18s} {'PyTorch':>8s} {'IR':>8s} {'drop':>6s} {'agree %':>8s}")
    results: dict = {}
    for label, model, data in pairs:
        for scheme in ["fp32", *args.schemes]:
            report = export(model, data, work / f"ir-{label}-{scheme}", scheme, args)
            results.setdefault(label, {})[scheme] = report["mDice_drop_points"]
            print(
                f"{label:28s} {scheme:18s} {100 * report['torch_mDice']:8.2f} {100 * report['ir_mDice']:8.2f} "
                f"{report['mDice_drop_points']:6.2f} {100 * report['argmax_agreement']:8.2f}",
                flush=True,
            )
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["lite_hrnet_s", "lite_hrnet_18", "lite_hrnet_x"])
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--schemes", nargs="+", default=["qat", "convs-fp32-head", "all"])
    parser.add_argument("--accuracy-models", nargs="*", default=["lite_hrnet_s"])
    parser.add_argument("--model", type=Path, action="append", default=[], help="a trained model folder")
    parser.add_argument("--data", type=Path, action="append", default=[], help="its dataset artifact")
    parser.add_argument("--qat-steps", type=int, default=300)
    parser.add_argument("--qat-lr", type=float, default=3e-4)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--skip-speed", action="store_true")
    parser.add_argument("--work", type=Path, help="keep trained models here (default: a temporary folder)")
    parser.add_argument("--out", type=Path, help="also write the accuracy results as JSON")
    args = parser.parse_args()
    if len(args.model) != len(args.data):
        parser.error("give one --data per --model")
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        work = args.work or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        if not args.skip_speed:
            speed_rows(work / "speed", args)
        pairs = [(f"{name} synthetic 128 px", *synthetic_model(work, name)) for name in args.accuracy_models]
        pairs += [(model.name, model, data) for model, data in zip(args.model, args.data, strict=True)]
        results = accuracy_rows(pairs, work, args)
        if args.out:
            args.out.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
