"""Export a trained model to OpenVINO IR (FP32, FP16 or INT8), and check the IR against PyTorch.

    IR_DIR/
      model.xml model.bin    the IR; rt_info model_info holds labels, normalisation, input size...
      export_report.json     parity: max logit difference, argmax agreement, mDice of both, latency

FP32 must agree with PyTorch within a logit tolerance. FP16 and INT8 may lose at most
``max_drop`` mDice points on the parity images. INT8 comes from NNCF post-training
quantisation on calibration images, optionally with accuracy control. A failed check publishes
nothing.
"""

from __future__ import annotations

import json
import logging
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from segflow.configs import check_numbers
from segflow.data import manifest as manifest_lib
from segflow.data.datasets import Normalization, SegmentationDataset
from segflow.errors import SegflowError
from segflow.evaluate.scoring import score
from segflow.export import qat, speed
from segflow.models import SegOutput
from segflow.models import artifact as model_artifact
from segflow.models.ir import IR_XML, IRSegmentor

log = logging.getLogger(__name__)
PRECISIONS = ("fp32", "fp16", "int8")

# Where INT8 goes (NNCF post-training quantisation, MIXED preset). Lite-HRNet's fuse step adds
# branch 0 to itself, so its pass-through channels grow module after module while the convolved
# ones stay normalised: one tensor holds channels whose scales differ by orders of magnitude, and
# one int8 scale per tensor loses the small ones. The schemes differ in which tensors they leave
# in float (benchmarks/inference.py measures each: RESULTS.md, "INT8 schemes").
_NOT_CONV_INPUTS = ["Add", "Multiply", "Interpolate", "Divide", "ReduceL2", "Sigmoid", "ReduceMean", "Concat"]
INT8_SCHEMES = {
    "all": {},  # NNCF's defaults: every input it can quantise
    "convs": {"types": _NOT_CONV_INPUTS},  # convolution inputs only
    "convs-fp32-head": {"types": _NOT_CONV_INPUTS, "head": True},  # and the classifier's in float
    "dense-fp32-head": {"types": [*_NOT_CONV_INPUTS, "GroupConvolution"], "head": True},  # no depthwise
}
ACCURATE_INT8_SCHEME = "convs-fp32-head"  # post-training, the most accurate placement measured
QAT_SCHEME = "qat"  # NNCF's default placement, then quantisation-aware fine-tuning (export/qat.py)
AUTO_SCHEME = "auto"  # QAT when it keeps within --max-drop on the parity images, else the accurate PTQ
SCHEMES = (AUTO_SCHEME, QAT_SCHEME, *INT8_SCHEMES)
DEFAULT_INT8_SCHEME = AUTO_SCHEME


def ignored_scope(ov_model, scheme: str):
    """The NNCF ignored scope of an INT8 scheme for this IR."""
    import nncf

    spec = INT8_SCHEMES[scheme]
    names = []
    if spec.get("head"):  # the FCN head's convolutions (OpenVINO keeps the module path in names)
        names = [
            op.get_friendly_name()
            for op in ov_model.get_ops()
            if op.get_type_name() == "Convolution" and ".head." in op.get_friendly_name()
        ]
    return nncf.IgnoredScope(types=spec.get("types", []), names=names, validate=False)


@dataclass(frozen=True)
class ExportConfig:
    model: str
    out: str
    precision: str = "fp32"
    calibration: str = ""  # dataset artifact: calibration (INT8) and parity images
    subset: str = "val"
    input_size: int = 0  # 0: the size the model was trained at
    dynamic: bool = False  # any batch and image size instead of 1 x 3 x S x S
    max_drop: float = 1.0  # mDice points FP16 / INT8 may lose
    accuracy_control: bool = False  # INT8: NNCF keeps the drop within max_drop by reverting layers
    tolerance: float = 1e-3  # FP32: max |logit difference| relative to the largest logit
    parity_images: int = 32
    calibration_images: int = 300
    int8_scheme: str = DEFAULT_INT8_SCHEME  # how INT8 is made (SCHEMES)
    qat_steps: int = 300  # quantisation-aware fine-tuning steps on the calibration data's train images
    qat_lr: float = 3e-4
    overwrite: bool = False

    def validate(self) -> None:
        check_numbers(self)
        if self.precision not in PRECISIONS:
            raise SegflowError(f"--precision must be one of {', '.join(PRECISIONS)} (got {self.precision!r}).")
        if self.precision == "int8" and not self.calibration:
            raise SegflowError("--precision int8 needs --calibration DS (a dataset artifact) to quantise with.")
        if self.input_size and (self.input_size % 32 or self.input_size < 32):
            raise SegflowError("--input-size must be a multiple of 32.")
        if self.max_drop < 0:
            raise SegflowError("--max-drop must be 0 or more (mDice points).")
        if self.int8_scheme not in SCHEMES:
            raise SegflowError(f"--int8-scheme must be one of {', '.join(SCHEMES)} (got {self.int8_scheme!r}).")
        if self.qat_steps < 0 or self.qat_lr <= 0:
            raise SegflowError("--qat-steps must be 0 or more and --qat-lr above 0.")


class _Logits(nn.Module):
    """The Segmentor with a plain tensor output, as the converter wants it."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x).logits


def convert(model: nn.Module, size: int, dynamic: bool):
    import openvino as ov

    shape = ov.PartialShape([-1, 3, -1, -1] if dynamic else [1, 3, size, size])
    example = torch.zeros(1, 3, size, size)
    with torch.no_grad(), warnings.catch_warnings():
        # NNCF's fake quantisers read their level counts as Python numbers: constants, as meant.
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        # Traced here, without torch's re-trace check (a third of the export time): the parity
        # check against PyTorch after conversion is the test that counts.
        net = model.eval() if isinstance(model, _Logits) else _Logits(model.eval())  # QAT wraps it already
        traced = torch.jit.trace(net, example, strict=False, check_trace=False)
        return ov.convert_model(traced, example_input=example, input=[shape])


def _square_batches(dataset: SegmentationDataset) -> DataLoader:
    return DataLoader(dataset, batch_size=1, shuffle=False)


def _scores(model, batches, num_classes: int) -> tuple[dict, list[np.ndarray]]:
    """Scores and raw logits of a PyTorch model or an IRSegmentor (same calling convention)."""
    logits: list[np.ndarray] = []
    scores = score(model, batches, num_classes, "cpu", keep=lambda _, out: logits.append(out.numpy()))
    return scores, logits


def measured_speed(ir_dir: Path, fp32_model, size: int, precision: str) -> dict:
    """The written IR's latency and throughput, and for FP16 / INT8 the FP32 IR's beside them
    (same process, one after the other) with the ratios: what the precision buys on this CPU."""
    import openvino as ov

    own = speed.measure(ov.Core().read_model(ir_dir / IR_XML), size, precision)
    report = {"latency_ms": round(own.latency_ms, 3), "throughput": round(own.throughput, 3)}
    if precision != "fp32":
        fp32 = speed.measure(fp32_model, size, "fp32")
        report |= {
            "fp32_latency_ms": round(fp32.latency_ms, 3),
            "fp32_throughput": round(fp32.throughput, 3),
            "latency_vs_fp32": round(fp32.latency_ms / own.latency_ms, 3),  # above 1: faster than FP32
            "throughput_vs_fp32": round(own.throughput / fp32.throughput, 3),
        }
    return report


def _mdice(compiled, items, num_classes: int) -> float:
    """mDice of a compiled OpenVINO model over dataset items (one image at a time)."""

    def run(images: torch.Tensor) -> SegOutput:
        return SegOutput(logits=torch.from_numpy(compiled(images.numpy())[0]))

    batches = ({"image": item["image"][None], "mask": item["mask"][None]} for item in items)
    return _scores(run, batches, num_classes)[0]["mDice"]


def quantize(
    ov_model,
    calibration: list[torch.Tensor],
    cfg: ExportConfig,
    scheme: str,
    validation: SegmentationDataset | None,
    num_classes: int,
):
    """NNCF post-training INT8 quantisation with ``scheme``'s placement, with accuracy control when asked."""
    import nncf

    items = [image.numpy() for image in calibration]
    calib = nncf.Dataset(items)
    common = {
        "subset_size": len(items),
        "preset": nncf.QuantizationPreset.MIXED,
        "ignored_scope": ignored_scope(ov_model, scheme),
    }
    if not cfg.accuracy_control or validation is None:
        return nncf.quantize(ov_model, calib, **common)

    val_items = [validation[i] for i in range(min(len(validation), cfg.parity_images))]

    def validate(compiled, data) -> tuple[float, None]:
        return _mdice(compiled, data, num_classes), None

    return nncf.quantize_with_accuracy_control(
        ov_model,
        calib,
        nncf.Dataset(val_items),
        validate,
        max_drop=cfg.max_drop / 100,
        drop_type=nncf.DropType.ABSOLUTE,
        **common,
    )


def quantize_aware(model_dir: Path, calibration: list[torch.Tensor], train_images: SegmentationDataset,
                   cfg: ExportConfig, size: int):  # fmt: skip
    """INT8 everywhere NNCF places it, fine-tuned on ``train_images`` (export/qat.py); an openvino.Model."""
    model, _ = model_artifact.load(model_dir, "cpu")  # a fresh copy to quantise; the caller's stays float
    teacher, _ = model_artifact.load(model_dir, "cpu")
    quantized = qat.quantize_torch(_Logits(model), calibration)
    settings = qat.QATConfig(steps=cfg.qat_steps, lr=cfg.qat_lr)
    quantized = qat.fine_tune(quantized, train_images, settings, teacher=_Logits(teacher).eval())
    return convert(quantized, size, cfg.dynamic)


def to_int8(fp32_model, model_dir: Path, data: dict, cfg: ExportConfig, size: int, num_classes: int,
            torch_mdice: float | None):  # fmt: skip
    """The INT8 model ``cfg.int8_scheme`` asks for, and what was tried. ``auto`` takes QAT's model
    when its mDice on the parity images is within ``cfg.max_drop`` of PyTorch's, else the accurate
    post-training placement; without parity images it cannot tell, and takes the accurate one."""
    import openvino as ov

    if cfg.int8_scheme != AUTO_SCHEME:
        schemes = [cfg.int8_scheme]
    elif torch_mdice is None:
        log.warning("no parity images to judge quantisation-aware INT8: using %s", ACCURATE_INT8_SCHEME)
        schemes = [ACCURATE_INT8_SCHEME]
    else:
        schemes = [QAT_SCHEME, ACCURATE_INT8_SCHEME]
    drops: dict[str, float] = {}
    seconds: dict[str, float] = {}
    for scheme in schemes:
        log.info("INT8 scheme %s", scheme)
        started = time.monotonic()
        if scheme == QAT_SCHEME:
            candidate = quantize_aware(model_dir, data["calibration"], data["train"], cfg, size)
        else:
            candidate = quantize(fp32_model, data["calibration"], cfg, scheme, data["parity"], num_classes)
        seconds[scheme] = round(time.monotonic() - started, 1)
        if len(schemes) == 1:
            break
        # Judged as the parity check below judges the written IR (IRSegmentor: f32 outside the INT8
        # ops); left to the plugin, a CPU with bf16 would score the candidate on other numbers.
        compiled = ov.Core().compile_model(candidate, "CPU", speed.F32)
        drops[scheme] = round(100 * (torch_mdice - _mdice(compiled, data["parity"], num_classes)), 3)
        if drops[scheme] <= cfg.max_drop:
            break
        log.info("INT8 scheme %s lost %.2f mDice points, more than --max-drop %s", scheme, drops[scheme], cfg.max_drop)
    chosen = {"int8_scheme": scheme, "int8_seconds": seconds}
    return candidate, chosen | ({"int8_candidates_drop": drops} if drops else {})


def export(cfg: ExportConfig, model_dir: Path, data_dir: Path | None, out_dir: Path) -> dict:
    """Convert, (quantise,) check parity, and write the IR into ``out_dir``; return the report.

    ``data_dir``: a dataset artifact for INT8 calibration and the parity check, or None (no check).
    A failed check raises, and the stage publishes nothing.
    """
    cfg.validate()
    model, config = model_artifact.load(model_dir, "cpu")
    if not hasattr(model, "state_dict"):
        raise SegflowError(f"--model {cfg.model} is already an OpenVINO IR: export from the PyTorch model folder.")
    size = cfg.input_size or config["input_size"]
    norm = Normalization(**config["normalization"])
    labels = config["labels"]
    parity = calibration = train_images = None
    if data_dir is not None:
        manifest = manifest_lib.read(data_dir, verify=True)
        if manifest["labels"] != labels:
            raise SegflowError(f"--calibration {cfg.calibration} has labels {manifest['labels']}, the model {labels}.")
        subset = cfg.subset if cfg.subset in manifest["subsets"] else next(iter(manifest["subsets"]))
        names = sorted(manifest["subsets"][subset]["items"])
        parity = SegmentationDataset(
            data_dir, subset, size, norm, train=False, names=names[: cfg.parity_images], square=True
        )
        train_subset = "train" if "train" in manifest["subsets"] else subset
        train_names = sorted(manifest["subsets"][train_subset]["items"])
        calibration = SegmentationDataset(
            data_dir, train_subset, size, norm, train=False, names=train_names[: cfg.calibration_images], square=True
        )
        # QAT's fine-tuning samples: the training recipe's crops (native-resolution tiles for a tiled model).
        tile_scale = (config.get("tiling") or {}).get("scale", 0.0)
        train_images = SegmentationDataset(data_dir, train_subset, size, norm, train=True, tile_scale=tile_scale)

    checked = parity is not None and len(parity) > 0
    if checked:
        loader = _square_batches(parity)
        torch_scores, torch_logits = _scores(model, loader, len(labels))
    fp32_model = ov_model = convert(model, size, cfg.dynamic)
    report: dict = {"precision": cfg.precision}
    if cfg.precision == "int8":
        # Decoded once: both schemes of auto calibrate on the same images.
        images = [calibration[i]["image"][None] for i in range(len(calibration))]
        data = {"calibration": images, "train": train_images, "parity": parity}
        ov_model, chosen = to_int8(
            fp32_model, model_dir, data, cfg, size, len(labels), torch_scores["mDice"] if checked else None
        )
        report.update(chosen)
    model_artifact.save_ir(out_dir, ov_model, config, cfg.precision)
    ir = IRSegmentor(out_dir)

    report.update({"input": "dynamic" if cfg.dynamic else [1, 3, size, size], "architecture": config["architecture"]})
    report.update(measured_speed(out_dir, fp32_model, size, cfg.precision))
    if checked:
        ir_scores, ir_logits = _scores(ir, loader, len(labels))
        diff = max(float(np.abs(a - b).max()) for a, b in zip(torch_logits, ir_logits, strict=True))
        scale = max(float(np.abs(a).max()) for a in torch_logits)
        agree = np.mean(
            [float((a.argmax(1) == b.argmax(1)).mean()) for a, b in zip(torch_logits, ir_logits, strict=True)]
        )
        drop = 100 * (torch_scores["mDice"] - ir_scores["mDice"])
        report.update(
            {
                "parity_images": len(parity),
                "max_abs_logit_diff": diff,
                "max_abs_logit": scale,
                "argmax_agreement": float(agree),
                "torch_mDice": torch_scores["mDice"],
                "ir_mDice": ir_scores["mDice"],
                "mDice_drop_points": drop,
            }
        )
        if cfg.precision == "fp32":
            limit = cfg.tolerance * max(1.0, scale)
            report["tolerance"] = limit
            report["passed"] = diff <= limit
            problem = f"max |logit difference| {diff:.2e} exceeds {limit:.2e}"
        else:
            report["max_drop_points"] = cfg.max_drop
            report["passed"] = drop <= cfg.max_drop
            problem = f"mDice fell {drop:.2f} points (from {100 * torch_scores['mDice']:.2f}), more than {cfg.max_drop}"
        if not report["passed"]:
            raise SegflowError(
                f"the {cfg.precision.upper()} IR disagrees with the PyTorch model: {problem}. Nothing was written."
                + (" Try --accuracy-control or a larger --max-drop." if cfg.precision == "int8" else "")
            )
    else:
        report["passed"] = None
        log.warning("no --calibration data: parity with PyTorch was not checked")
    report["metrics"] = {
        k: report[k]
        for k in (
            "latency_ms",
            "throughput",
            "throughput_vs_fp32",
            "latency_vs_fp32",
            "ir_mDice",
            "torch_mDice",
            "mDice_drop_points",
            "max_abs_logit_diff",
            "argmax_agreement",
        )
        if k in report
    }
    (out_dir / "export_report.json").write_text(json.dumps(report, indent=2) + "\n")
    report["output"] = str(cfg.out)
    return report


__all__ = ["ExportConfig", "export"]
