"""Decoder pieces: the iterative aggregator that merges branches coarse to fine, and the FCN head."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from segflow.models.lite_hrnet import conv_bn


class IterativeAggregator(nn.Module):
    """From the coarsest branch to the finest: upsample the running map, add the branch, then a
    depthwise-separable 3x3 projection to the next finer branch's width. Returns the finest map.

    ``min_channels``: branches narrower than this are first widened by a 1x1 conv, and no
    projection is narrower (x-mod3's 18-channel finest branch is lifted to 60).
    ``spatial_norm``: L2-normalise both maps over their positions (per image and channel) before
    adding them, as the reference's s and x configs do.
    Upsampling aligns corners, as the reference does.
    """

    def __init__(self, channels: list[int], min_channels: int = 0, spatial_norm: bool = False) -> None:
        super().__init__()
        self.spatial_norm = spatial_norm
        widths = [max(c, min_channels) for c in channels[::-1]]  # coarse to fine
        self.expanders = nn.ModuleList(
            conv_bn(c, min_channels, 1) if c < min_channels else nn.Identity() for c in channels[::-1]
        )
        self.projects = nn.ModuleList()
        for i, c in enumerate(widths):
            out = widths[i + 1] if i + 1 < len(widths) else c
            self.projects.append(nn.Sequential(conv_bn(c, c, 3, groups=c), conv_bn(c, out, 1)))
        self.out_channels = widths[-1]

    def forward(self, xs: list[torch.Tensor]) -> torch.Tensor:
        last = None
        for x, expand, project in zip(xs[::-1], self.expanders, self.projects, strict=True):
            x = expand(x)
            if last is not None:
                up = F.interpolate(last, size=x.shape[-2:], mode="bilinear", align_corners=True)
                x = _spatial_l2(x) + _spatial_l2(up) if self.spatial_norm else x + up
            last = project(x)
        return last


def _spatial_l2(x: torch.Tensor) -> torch.Tensor:
    return F.normalize(x.flatten(2), dim=2).view_as(x)


class FCNHead(nn.Module):
    """One 1x1 conv + BN (no activation after it, as in the reference), then the 1x1 classifier
    (no dropout)."""

    def __init__(self, in_channels: int, channels: int, num_classes: int) -> None:
        super().__init__()
        self.conv = conv_bn(in_channels, channels, 1, act=False)
        self.classifier = nn.Conv2d(channels, num_classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.conv(x))

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)
