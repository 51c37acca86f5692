"""Lite-HRNet backbones (s-mod2, 18-mod2, x-mod3), written from the architecture in the paper
"Lite-HRNet: A Lightweight High-Resolution Network" and the OTX segmentation configs.

Shape of the network:
- a stem (3x3 conv, optional extra stride, then a shuffle block) brings the image to the finest
  branch's resolution;
- stages of parallel branches, each half the resolution and more channels than the last; a new
  branch is spawned at the start of each stage (transition);
- every module holds "conditional channel weighting" blocks (no 1x1 convs on the full width: half
  the channels are reweighted by a cross-resolution gate and a per-branch spatial gate, then mixed
  back by a channel shuffle), and ends by fusing every branch into every other (HRNet fuse).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class StemSpec:
    channels: int
    out_channels: int
    strides: tuple[int, int]
    extra_stride: bool


@dataclass(frozen=True)
class LiteHRNetSpec:
    """Everything that distinguishes one member of the family from another."""

    stem: StemSpec
    num_modules: tuple[int, ...]  # per stage
    num_branches: tuple[int, ...]  # per stage
    num_blocks: int  # weighting blocks per module
    reduce_ratios: tuple[int, ...]  # cross-resolution weighting bottleneck, per stage
    channels: tuple[tuple[int, ...], ...]  # per stage, per branch
    head_channels: int  # FCN head width
    aggregator_min_channels: int = 0  # widen narrower branches to this before aggregating
    # The reference's s and x configs L2-normalise both maps over their spatial positions before
    # the aggregator adds them (their merge-norm setting is the string "None", which selects that
    # branch); its 18 config adds them as they are.
    aggregator_spatial_norm: bool = False

    @property
    def out_channels(self) -> tuple[int, ...]:
        return self.channels[-1]

    @property
    def stride(self) -> int:
        """Stride of the finest branch relative to the input."""
        s = self.stem.strides[0] * self.stem.strides[1]
        return s * 2 if self.stem.extra_stride else s


SPECS: dict[str, LiteHRNetSpec] = {
    "lite_hrnet_s": LiteHRNetSpec(
        stem=StemSpec(32, 32, (2, 2), extra_stride=True),
        num_modules=(4, 4),
        num_branches=(2, 3),
        num_blocks=2,
        reduce_ratios=(8, 8),
        channels=((60, 120), (60, 120, 240)),
        head_channels=60,
        aggregator_spatial_norm=True,
    ),
    "lite_hrnet_18": LiteHRNetSpec(
        stem=StemSpec(32, 32, (2, 2), extra_stride=False),
        num_modules=(2, 4, 2),
        num_branches=(2, 3, 4),
        num_blocks=2,
        reduce_ratios=(8, 8, 8),
        channels=((40, 80), (40, 80, 160), (40, 80, 160, 320)),
        head_channels=40,
    ),
    "lite_hrnet_x": LiteHRNetSpec(
        stem=StemSpec(60, 60, (2, 1), extra_stride=False),
        num_modules=(2, 4, 4, 2),
        num_branches=(2, 3, 4, 5),
        num_blocks=2,
        reduce_ratios=(2, 4, 8, 8),
        channels=((18, 60), (18, 60, 80), (18, 60, 80, 160), (18, 60, 80, 160, 320)),
        head_channels=60,
        aggregator_min_channels=60,
        aggregator_spatial_norm=True,
    ),
}


def conv_bn(cin: int, cout: int, kernel: int = 1, stride: int = 1, groups: int = 1, act: bool = True) -> nn.Sequential:
    """Conv (no bias: BN follows) + BN (+ ReLU)."""
    layers: list[nn.Module] = [
        nn.Conv2d(cin, cout, kernel, stride, kernel // 2, groups=groups, bias=False),
        nn.BatchNorm2d(cout),
    ]
    if act:
        layers.append(nn.ReLU(inplace=True))
    return nn.Sequential(*layers)


def dw_then_pw(cin: int, cout: int, stride: int, act: bool = True) -> nn.Sequential:
    """Depthwise 3x3 (+BN) then pointwise 1x1 (+BN, optional ReLU): the cheap "conv" of the family."""
    return nn.Sequential(conv_bn(cin, cin, 3, stride, groups=cin, act=False), conv_bn(cin, cout, 1, act=act))


def interleave(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``channel_shuffle(cat([a, b]), 2)`` in one copy instead of two: channels a0 b0 a1 b1 ..."""
    return torch.stack([a, b], dim=2).flatten(1, 2)


class Stem(nn.Module):
    """3x3 conv, optional extra stride, then a shuffle block that halves the resolution again."""

    def __init__(self, spec: StemSpec) -> None:
        super().__init__()
        c = spec.channels
        self.conv1 = conv_bn(3, c, 3, spec.strides[0])
        self.conv2 = conv_bn(c, c, 3, 2) if spec.extra_stride else None
        half = c // 2
        inc = spec.out_channels - half if c == spec.out_channels else spec.out_channels - c
        self.branch1 = nn.Sequential(
            conv_bn(half, half, 3, spec.strides[1], groups=half, act=False), conv_bn(half, inc)
        )
        self.expand = conv_bn(half, c, 1)  # expand ratio 1
        self.depthwise = conv_bn(c, c, 3, spec.strides[1], groups=c, act=False)
        self.linear = conv_bn(c, half if c == spec.out_channels else c, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv1(x)
        if self.conv2 is not None:
            x = self.conv2(x)
        x1, x2 = x.chunk(2, dim=1)
        x2 = self.linear(self.depthwise(self.expand(x2)))
        return interleave(self.branch1(x1), x2)


class CrossResolutionWeighting(nn.Module):
    """One gate computed from all branches pooled to the coarsest size, split back per branch."""

    def __init__(self, channels: list[int], ratio: int) -> None:
        super().__init__()
        self.channels = channels
        total = sum(channels)
        self.reduce = conv_bn(total, total // ratio, 1)
        self.expand = nn.Sequential(
            nn.Conv2d(total // ratio, total, 1, bias=False), nn.BatchNorm2d(total), nn.Sigmoid()
        )

    def forward(self, xs: list[torch.Tensor]) -> list[torch.Tensor]:
        size = xs[-1].shape[-2:]
        pooled = [F.adaptive_avg_pool2d(x, size) for x in xs[:-1]] + [xs[-1]]
        gates = self.expand(self.reduce(torch.cat(pooled, dim=1))).split(self.channels, dim=1)
        return [x * F.interpolate(g, size=x.shape[-2:], mode="nearest") for x, g in zip(xs, gates, strict=True)]


class SpatialWeighting(nn.Module):
    """Squeeze-and-excitation style gate of one branch (ratio 4)."""

    def __init__(self, channels: int, ratio: int = 4) -> None:
        super().__init__()
        self.gate = nn.Sequential(
            nn.AdaptiveAvgPool2d(1),
            nn.Conv2d(channels, channels // ratio, 1),
            nn.ReLU(inplace=True),
            nn.Conv2d(channels // ratio, channels, 1),
            nn.Sigmoid(),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gate(x)


class ConditionalChannelWeighting(nn.Module):
    """The LITE block: half of each branch is reweighted and depthwise-filtered, then shuffled back."""

    def __init__(self, channels: list[int], reduce_ratio: int) -> None:
        super().__init__()
        halves = [c // 2 for c in channels]
        self.cross_resolution = CrossResolutionWeighting(halves, reduce_ratio)
        self.depthwise = nn.ModuleList(conv_bn(c, c, 3, groups=c, act=False) for c in halves)
        self.spatial = nn.ModuleList(SpatialWeighting(c) for c in halves)

    def forward(self, xs: list[torch.Tensor]) -> list[torch.Tensor]:
        parts = [x.chunk(2, dim=1) for x in xs]
        moved = self.cross_resolution([p[1] for p in parts])
        moved = [sw(dw(x)) for x, dw, sw in zip(moved, self.depthwise, self.spatial, strict=True)]
        return [interleave(p[0], m) for p, m in zip(parts, moved, strict=True)]


class FuseLayer(nn.Module):
    """HRNet fuse: every output branch sums all branches brought to its resolution and width.

    The reference (the official Lite-HRNet code and OTX) adds branch 0 in place while it builds
    output 0, so branch 0 enters output 0 twice, and every coarser output reads branch 0 *after*
    it has absorbed the coarser branches (``y0`` below), and adds that path twice too. We compute
    the same function without the in-place aliasing, and run each stride-2 path from ``y0`` once,
    doubling its result instead of recomputing it.
    """

    def __init__(self, channels: list[int]) -> None:
        super().__init__()
        self.paths = nn.ModuleList()
        for i, ci in enumerate(channels):
            row = nn.ModuleList()
            for j, cj in enumerate(channels):
                if j > i:  # coarser: 1x1 to the width, upsample later
                    row.append(conv_bn(cj, ci, 1, act=False))
                elif j == i:
                    row.append(nn.Identity())
                else:  # finer: stride-2 depthwise-separable steps, last one to the target width
                    steps = [dw_then_pw(cj, cj, 2) for _ in range(i - j - 1)]
                    steps.append(dw_then_pw(cj, ci, 2, act=False))
                    row.append(nn.Sequential(*steps))
            self.paths.append(row)

    def _add(self, i: int, j: int, y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """``y`` plus branch ``j`` (``x``) brought to output ``i``'s resolution and width."""
        z = self.paths[i][j](x)
        return y + (F.interpolate(z, size=y.shape[-2:], mode="nearest") if j > i else z)

    def forward(self, xs: list[torch.Tensor]) -> list[torch.Tensor]:
        def plus_branches_from_1(i: int, y: torch.Tensor) -> torch.Tensor:
            for j in range(1, len(xs)):
                if j != i:
                    y = self._add(i, j, y, xs[j])
            return y

        y0 = plus_branches_from_1(0, 2 * xs[0])  # the reference adds branch 0 to itself
        outs = [F.relu(y0)]
        for i in range(1, len(xs)):
            # One stride-2 path from y0, counted twice.
            outs.append(F.relu(plus_branches_from_1(i, torch.add(xs[i], self.paths[i][0](y0), alpha=2))))
        return outs


class LiteHRModule(nn.Module):
    def __init__(self, channels: list[int], num_blocks: int, reduce_ratio: int) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(ConditionalChannelWeighting(channels, reduce_ratio) for _ in range(num_blocks))
        self.fuse = FuseLayer(channels)

    def forward(self, xs: list[torch.Tensor]) -> list[torch.Tensor]:
        for block in self.blocks:
            xs = block(xs)
        return self.fuse(xs)


class Transition(nn.Module):
    """Adapt the previous stage's branches to this stage's widths; spawn the new coarsest branch."""

    def __init__(self, before: list[int], after: list[int]) -> None:
        super().__init__()
        self.layers = nn.ModuleList()
        for i, c in enumerate(after):
            if i < len(before):
                self.layers.append(nn.Identity() if before[i] == c else dw_then_pw(before[i], c, 1))
            else:
                last = before[-1]
                steps = [dw_then_pw(last, last, 2) for _ in range(i - len(before))]
                steps.append(dw_then_pw(last, c, 2))
                self.layers.append(nn.Sequential(*steps))
        self.num_before = len(before)

    def forward(self, xs: list[torch.Tensor]) -> list[torch.Tensor]:
        return [layer(xs[min(i, self.num_before - 1)]) for i, layer in enumerate(self.layers)]


class LiteHRNet(nn.Module):
    """Returns every branch of the last stage (finest first), and optionally each stage's outputs."""

    def __init__(self, spec: LiteHRNetSpec) -> None:
        super().__init__()
        self.spec = spec
        self.stem = Stem(spec.stem)
        self.transitions = nn.ModuleList()
        self.stages = nn.ModuleList()
        before = [spec.stem.out_channels]
        for s, channels in enumerate(spec.channels):
            self.transitions.append(Transition(before, list(channels)))
            self.stages.append(
                nn.Sequential(
                    *(
                        LiteHRModule(list(channels), spec.num_blocks, spec.reduce_ratios[s])
                        for _ in range(spec.num_modules[s])
                    )
                )
            )
            before = list(channels)

    def forward(self, x: torch.Tensor, all_stages: bool = False):
        xs = [self.stem(x)]
        stage_outputs = []
        for transition, stage in zip(self.transitions, self.stages, strict=True):
            xs = stage(transition(xs))
            stage_outputs.append(xs)
        return stage_outputs if all_stages else xs
