"""Batch-level augmentations on tensors (already normalised), for the contrastive views and the
Mean Teacher student. Random numbers come from a CPU generator handed in by the step."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _uniform(n: int, low: float, high: float, g: torch.Generator) -> torch.Tensor:
    return low + (high - low) * torch.rand(n, generator=g)


def crop_flip_grid(n: int, size: tuple[int, int], g: torch.Generator, scale=(0.4, 1.0)) -> torch.Tensor:
    """Sampling grids of random crops (area share ``scale``, aspect 3/4-4/3) with random flips."""
    area = _uniform(n, *scale, g)
    aspect = torch.exp(_uniform(n, -0.2877, 0.2877, g))  # log(3/4) .. log(4/3)
    sw = torch.sqrt(area * aspect).clamp(max=1.0)
    sh = torch.sqrt(area / aspect).clamp(max=1.0)
    cx = (1 - sw) * (2 * torch.rand(n, generator=g) - 1)
    cy = (1 - sh) * (2 * torch.rand(n, generator=g) - 1)
    sign = torch.where(torch.rand(n, generator=g) < 0.5, -1.0, 1.0)
    theta = torch.zeros(n, 2, 3)
    theta[:, 0, 0] = sw * sign
    theta[:, 0, 2] = cx
    theta[:, 1, 1] = sh
    theta[:, 1, 2] = cy
    return F.affine_grid(theta, [n, 1, *size], align_corners=False)


def random_views(images: torch.Tensor, masks: torch.Tensor, g: torch.Generator):
    """Two random crops (with flips) of each image and its mask: (view1, mask1, view2, mask2)."""
    n, _, h, w = images.shape
    out = []
    for _ in range(2):
        grid = crop_flip_grid(n, (h, w), g).to(images.device, images.dtype)
        view = F.grid_sample(images, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
        mask = F.grid_sample(masks[:, None].to(images.dtype), grid, mode="nearest", align_corners=False)
        out += [view, mask[:, 0].round().long()]
    return out[0], out[1], out[2], out[3]


def photometric_views(images: torch.Tensor, g: torch.Generator, strength: float = 0.4) -> torch.Tensor:
    """Per-image brightness and contrast jitter, plus greyscale with probability 0.2."""
    n = images.shape[0]
    brightness = _uniform(n, -strength, strength, g).view(n, 1, 1, 1).to(images)
    contrast = _uniform(n, 1 - strength, 1 + strength, g).view(n, 1, 1, 1).to(images)
    grey = (torch.rand(n, generator=g) < 0.2).view(n, 1, 1, 1).to(images.device)
    mean = images.mean(dim=(1, 2, 3), keepdim=True)
    out = (images - mean) * contrast + mean + brightness
    return torch.where(grey, out.mean(1, keepdim=True).expand_as(out), out)


def strong_augment(images: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Mean Teacher's student input: photometric jitter, greyscale, and one CutOut box per image."""
    out = photometric_views(images, g, strength=0.5)
    n, _, h, w = out.shape
    bh = (_uniform(n, 0.1, 0.4, g) * h).long()
    bw = (_uniform(n, 0.1, 0.4, g) * w).long()
    y0 = (torch.rand(n, generator=g) * (h - bh)).long()
    x0 = (torch.rand(n, generator=g) * (w - bw)).long()
    ys = torch.arange(h).view(1, h, 1)
    xs = torch.arange(w).view(1, 1, w)
    box = (
        (ys >= y0.view(n, 1, 1))
        & (ys < (y0 + bh).view(n, 1, 1))
        & (xs >= x0.view(n, 1, 1))
        & (xs < (x0 + bw).view(n, 1, 1))
    )
    return out.masked_fill(box[:, None].to(out.device), 0.0)
