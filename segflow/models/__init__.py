"""Segmentation models: ``create_model("lite_hrnet_s" | "lite_hrnet_18" | "lite_hrnet_x", num_classes)``."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from segflow.errors import SegflowError
from segflow.models.heads import FCNHead, IterativeAggregator
from segflow.models.lite_hrnet import SPECS, LiteHRNet, LiteHRNetSpec

MODEL_NAMES = tuple(SPECS)
# Which function the family computes. Bump it when the same weights would give other outputs:
# artifacts and checkpoints record it, and older ones are refused instead of silently predicting
# something else. 2: the reference function (OTX / official Lite-HRNet), 1: segflow 0.1's variant.
FUNCTION_VERSION = 2

# Published figures of the reference implementation (OpenVINO Training Extensions' Lite-HRNet
# segmentation models, 3 classes): parameters, model size in MB and GFLOPs at 512 x 512.
PUBLISHED = {
    "lite_hrnet_s": {"params": 828_955, "gflops": 1.44, "mb": 3.2},
    "lite_hrnet_18": {"params": 1_131_875, "gflops": 2.82, "mb": 4.3},
    "lite_hrnet_x": {"params": 1_503_697, "gflops": 9.20, "mb": 5.7},
}
INPUT_SIZES = (32, 4096)  # multiples of 32: the coarsest branch is at stride 32


@dataclass
class SegOutput:
    logits: torch.Tensor  # N x C x H x W at the input size
    aux_logits: torch.Tensor | None = None  # from a shallower level (multi-level adaptation)
    features: torch.Tensor | None = None  # the head's features before the classifier (contrastive learning)


class Segmentor(nn.Module):
    """Backbone -> aggregator -> FCN head, with an optional auxiliary head on the previous stage."""

    def __init__(self, name: str, spec: LiteHRNetSpec, num_classes: int, aux: bool = False) -> None:
        super().__init__()
        self.name = name
        self.spec = spec
        self.num_classes = num_classes
        self.backbone = LiteHRNet(spec)
        self.aggregator = IterativeAggregator(
            list(spec.out_channels), spec.aggregator_min_channels, spec.aggregator_spatial_norm
        )
        self.head = FCNHead(self.aggregator.out_channels, spec.head_channels, num_classes)
        # AdaptSegNet-style second output: the last-but-one stage is the "shallower level".
        shallow = spec.channels[-2] if len(spec.channels) > 1 else spec.channels[-1]
        self.aux_aggregator = (
            IterativeAggregator(list(shallow), spec.aggregator_min_channels, spec.aggregator_spatial_norm)
            if aux
            else None
        )
        self.aux_head = FCNHead(self.aux_aggregator.out_channels, spec.head_channels, num_classes) if aux else None

    def forward(self, x: torch.Tensor, with_aux: bool = False, with_features: bool = False) -> SegOutput:
        size = x.shape[-2:]
        stages = self.backbone(x, all_stages=True)
        fused = self.aggregator(stages[-1])
        features = self.head.features(fused)
        logits = F.interpolate(self.head.classifier(features), size=size, mode="bilinear", align_corners=False)
        out = SegOutput(logits=logits, features=features if with_features else None)
        if with_aux:
            if self.aux_head is None:
                raise SegflowError(f"{self.name} was built without an auxiliary head: create_model(..., aux=True).")
            shallow = stages[-2] if len(stages) > 1 else stages[-1]
            aux = self.aux_head(self.aux_aggregator(shallow))
            out.aux_logits = F.interpolate(aux, size=size, mode="bilinear", align_corners=False)
        return out


def check_input_size(size: int, setting: str = "--input-size") -> int:
    """One rule for every command: a multiple of 32 within INPUT_SIZES."""
    low, high = INPUT_SIZES
    if not (low <= size <= high and size % 32 == 0):
        raise SegflowError(f"{setting} must be a multiple of 32 between {low} and {high} (got {size}).")
    return size


def check_name(name: str, setting: str = "--model") -> str:
    """``name`` if it names a model of the family; otherwise a clear error naming the setting."""
    if name not in SPECS:
        raise SegflowError(f"{setting} {name!r} is not known: choose one of {', '.join(MODEL_NAMES)}.")
    return name


def create_model(name: str, num_classes: int, aux: bool = False) -> Segmentor:
    """Build a segmentation model by name (``artifact.with_backbone`` starts one from pretrained weights)."""
    check_name(name, "model")
    if num_classes < 2:
        raise SegflowError(f"a segmentation model needs at least 2 classes (got {num_classes}).")
    return Segmentor(name, SPECS[name], num_classes, aux=aux)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def model_cost(name: str, num_classes: int = 3, size: int = 512) -> dict:
    """Parameters, fp32 MiB and GMAC (convolutions and matmuls) of one forward pass at ``size``."""
    from torch.utils.flop_counter import FlopCounterMode

    model = create_model(name, num_classes).eval()
    params = count_parameters(model)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(torch.zeros(1, 3, size, size))
    return {"params": params, "mib": params * 4 / 2**20, "gmac": counter.get_total_flops() / 2e9}
