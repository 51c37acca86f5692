"""Run an exported OpenVINO IR like a PyTorch model: same call, same output type.

The IR describes itself: labels, normalisation, input size, architecture, dataset fingerprint
and precision live in its rt_info under ``model_info``, so an IR folder needs nothing beside
``model.xml`` / ``model.bin``.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from segflow.errors import SegflowError
from segflow.models import SegOutput

IR_XML = "model.xml"
IR_BIN = "model.bin"
IR_FORMAT = "segflow.ir/1"
META_KEYS = (
    "format", "architecture", "labels", "normalization", "input_size", "dataset_fingerprint", "precision",
    "dataset_ids", "tiling",
)  # fmt: skip


def is_ir(folder: str | Path) -> bool:
    return (Path(folder) / IR_XML).exists()


def write_metadata(ov_model, config: dict, precision: str) -> None:
    """Store the model's config in the IR's rt_info (JSON strings under model_info)."""
    meta = {**{k: config[k] for k in META_KEYS if k in config}, "format": IR_FORMAT, "precision": precision}
    for key, value in meta.items():
        ov_model.set_rt_info(json.dumps(value), ["model_info", key])


def read_metadata(ov_model) -> dict:
    meta = {}
    for key in META_KEYS:
        if ov_model.has_rt_info(["model_info", key]):
            try:
                meta[key] = json.loads(ov_model.get_rt_info(["model_info", key]).astype(str))
            except (ValueError, RecursionError):
                raise SegflowError(f"this IR's rt_info model_info {key} is damaged: export it again.") from None
    if meta.get("format") != IR_FORMAT:
        raise SegflowError("this IR carries no segflow metadata (rt_info model_info): export it with `segflow export`.")
    labels = meta.get("labels")
    meta["num_classes"] = len(labels) if isinstance(labels, list) else None  # checked by the artifact module
    return meta


class IRSegmentor:
    """An OpenVINO-compiled segmentation model with the Segmentor calling convention.

    A static IR (one input size) gets every image resized to its size and the logits resized
    back, so it scores any image, as the PyTorch model does.
    """

    training = False

    def __init__(
        self, folder: str | Path, device: str = "CPU", hint: str = "LATENCY", inference_precision: str = "f32"
    ) -> None:
        import openvino as ov

        folder = Path(folder)
        core = ov.Core()
        try:
            model = core.read_model(folder / IR_XML)
        except RuntimeError as exc:
            reason = str(exc).strip().splitlines()[-1]
            raise SegflowError(
                f"{folder / IR_XML} cannot be read by OpenVINO ({reason}): the IR is damaged (a truncated "
                f"{IR_BIN}?). Export it again with `segflow export`."
            ) from None
        self.config = read_metadata(model)
        channels = model.output(0).get_partial_shape()[1]
        if channels.is_static and channels.get_length() != self.config["num_classes"]:
            raise SegflowError(
                f"{folder / IR_XML} outputs {channels.get_length()} classes but its metadata names "
                f"{self.config['num_classes']} labels: export it again."
            )
        shape = model.input(0).get_partial_shape()
        self.static = shape.is_static
        self.size = (shape[2].get_length(), shape[3].get_length()) if self.static else None
        # f32 by default: CPUs with AMX or AVX512-BF16 would otherwise run in bf16 and drift from PyTorch.
        properties = {"PERFORMANCE_HINT": hint}
        if inference_precision:
            properties["INFERENCE_PRECISION_HINT"] = inference_precision
        self.compiled = core.compile_model(model, device, properties)
        self.request = self.compiled.create_infer_request()

    def eval(self) -> IRSegmentor:
        return self

    def train(self, mode: bool = True) -> IRSegmentor:
        return self

    def infer(self, batch: np.ndarray) -> np.ndarray:
        """Logits of N x 3 x H x W normalised float32 input (one image at a time for a static IR)."""
        if not self.static:
            return self.request.infer({0: batch})[0].copy()
        return np.concatenate([self.request.infer({0: image[None]})[0].copy() for image in batch])

    def __call__(self, images: torch.Tensor, **_) -> SegOutput:
        size = images.shape[-2:]
        x = images.float().cpu()
        if self.static and tuple(size) != self.size:
            x = F.interpolate(x, size=self.size, mode="bilinear", align_corners=False)
        logits = torch.from_numpy(self.infer(np.ascontiguousarray(x.numpy())))
        if tuple(logits.shape[-2:]) != tuple(size):
            logits = F.interpolate(logits, size=size, mode="bilinear", align_corners=False)
        return SegOutput(logits=logits)
