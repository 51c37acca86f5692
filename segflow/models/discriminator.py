"""AdaptSegNet's output-space discriminator (Tsai et al., "Learning to Adapt Structured Output Space
for Semantic Segmentation", CVPR 2018), which ADVENT reuses on entropy maps.

Fully convolutional: five 4x4 convolutions with stride 2 (C -> w -> 2w -> 4w -> 8w -> 1, w = 64 in
the paper), a LeakyReLU(0.2) after the first four. It reads a C-channel map (softmax
probabilities, or ADVENT's weighted self-information) and says, per patch, how much it looks
like the target domain (a logit: source 0, target 1).
"""

from __future__ import annotations

from itertools import pairwise

import torch
from torch import nn


class OutputDiscriminator(nn.Module):
    def __init__(self, in_channels: int, width: int = 64) -> None:
        super().__init__()
        widths = [in_channels, width, width * 2, width * 4, width * 8]
        layers: list[nn.Module] = []
        for cin, cout in pairwise(widths):
            layers += [nn.Conv2d(cin, cout, 4, stride=2, padding=1), nn.LeakyReLU(0.2, inplace=True)]
        layers.append(nn.Conv2d(widths[-1], 1, 4, stride=2, padding=1))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)
