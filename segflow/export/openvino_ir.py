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
from segflow.models import SegOutput
from segflow.models import artifact as model_artifact
from segflow.models.ir import IRSegmentor

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
DEFAULT_INT8_SCHEME = "convs-fp32-head"


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
    int8_scheme: str = DEFAULT_INT8_SCHEME  # which tensors INT8 quantises (INT8_SCHEMES)
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
        if self.int8_scheme not in INT8_SCHEMES:
            raise SegflowError(f"--int8-scheme must be one of {', '.join(INT8_SCHEMES)} (got {self.int8_scheme!r}).")


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
    with torch.no_grad():
        # Traced here, without torch's re-trace check (a third of the export time): the parity
        # check against PyTorch after conversion is the test that counts.
        traced = torch.jit.trace(_Logits(model.eval()), example, strict=False, check_trace=False)
        return ov.convert_model(traced, example_input=example, input=[shape])


def _square_batches(dataset: SegmentationDataset) -> DataLoader:
    return DataLoader(dataset, batch_size=1, shuffle=False)


def _scores(model, batches, num_classes: int) -> tuple[dict, list[np.ndarray]]:
    """Scores and raw logits of a PyTorch model or an IRSegmentor (same calling convention)."""
    logits: list[np.ndarray] = []
    scores = score(model, batches, num_classes, "cpu", keep=lambda _, out: logits.append(out.numpy()))
    return scores, logits


def latency_ms(ir: IRSegmentor, size: int, runs: int = 20) -> float:
    x = np.random.default_rng(0).standard_normal((1, 3, size, size)).astype(np.float32)
    ir.infer(x)
    start = time.perf_counter()
    for _ in range(runs):
        ir.infer(x)
    return 1000 * (time.perf_counter() - start) / runs


def quantize(
    ov_model,
    calibration: SegmentationDataset,
    cfg: ExportConfig,
    validation: SegmentationDataset | None,
    num_classes: int,
):
    """NNCF post-training INT8 quantisation, with accuracy control when asked."""
    import nncf

    items = [calibration[i]["image"][None].numpy() for i in range(min(len(calibration), cfg.calibration_images))]
    calib = nncf.Dataset(items)
    common = {
        "subset_size": len(items),
        "preset": nncf.QuantizationPreset.MIXED,
        "ignored_scope": ignored_scope(ov_model, cfg.int8_scheme),
    }
    if not cfg.accuracy_control or validation is None:
        return nncf.quantize(ov_model, calib, **common)

    val_items = [validation[i] for i in range(min(len(validation), cfg.parity_images))]

    def validate(compiled, data) -> tuple[float, None]:
        def run(images: torch.Tensor) -> SegOutput:
            return SegOutput(logits=torch.from_numpy(compiled(images.numpy())[0]))

        batches = ({"image": item["image"][None], "mask": item["mask"][None]} for item in data)
        return _scores(run, batches, num_classes)[0]["mDice"], None

    return nncf.quantize_with_accuracy_control(
        ov_model,
        calib,
        nncf.Dataset(val_items),
        validate,
        max_drop=cfg.max_drop / 100,
        drop_type=nncf.DropType.ABSOLUTE,
        **common,
    )


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
    parity = calibration = None
    if data_dir is not None:
        manifest = manifest_lib.read(data_dir, verify=True)
        if manifest["labels"] != labels:
            raise SegflowError(f"--calibration {cfg.calibration} has labels {manifest['labels']}, the model {labels}.")
        subset = cfg.subset if cfg.subset in manifest["subsets"] else next(iter(manifest["subsets"]))
        names = sorted(manifest["subsets"][subset]["items"])
        parity = SegmentationDataset(
            data_dir, subset, size, norm, train=False, names=names[: cfg.parity_images], square=True
        )
        train_names = sorted(manifest["subsets"].get("train", {}).get("items", names))
        calibration = SegmentationDataset(
            data_dir,
            "train" if "train" in manifest["subsets"] else subset,
            size,
            norm,
            train=False,
            names=train_names[: cfg.calibration_images],
            square=True,
        )

    ov_model = convert(model, size, cfg.dynamic)
    if cfg.precision == "int8":
        log.info("quantising to INT8 on %d calibration images", min(len(calibration), cfg.calibration_images))
        ov_model = quantize(ov_model, calibration, cfg, parity, len(labels))
    model_artifact.save_ir(out_dir, ov_model, config, cfg.precision)
    ir = IRSegmentor(out_dir)

    report = {
        "precision": cfg.precision,
        **({"int8_scheme": cfg.int8_scheme} if cfg.precision == "int8" else {}),
        "input": "dynamic" if cfg.dynamic else [1, 3, size, size],
        "architecture": config["architecture"],
        "latency_ms": round(latency_ms(ir, size), 3),
    }
    if parity is not None and len(parity) > 0:
        loader = _square_batches(parity)
        torch_scores, torch_logits = _scores(model, loader, len(labels))
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
