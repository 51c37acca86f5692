"""The speed protocol shared by segflow and the reference (OTX 2.6), so both sides run the same
code: torch's Adam with its defaults, cross-entropy on logits at the input size, a fixed batch,
a fixed thread count; warm-up steps, then timed steps. Pure torch: the reference's environment
imports this file too (benchmarks/otx_reference.py).
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch


def train_img_s(
    forward: Callable[[torch.Tensor], torch.Tensor],
    params,
    size: int = 256,
    batch: int = 8,
    classes: int = 3,
    warmup: int = 2,
    steps: int = 5,
) -> float:
    """Images per second of full training steps (forward, CE loss, backward, Adam)."""
    torch.manual_seed(0)
    x, target = torch.randn(batch, 3, size, size), torch.randint(0, classes, (batch, size, size))
    optimizer, loss_fn = torch.optim.Adam(params, 1e-3), torch.nn.CrossEntropyLoss()
    for i in range(warmup + steps):
        if i == warmup:
            start = time.perf_counter()
        loss_fn(forward(x), target).backward()
        optimizer.step()
        optimizer.zero_grad()
    return steps * batch / (time.perf_counter() - start)


def infer_ms(
    forward: Callable[[torch.Tensor], torch.Tensor], size: int = 512, warmup: int = 2, steps: int = 5
) -> float:
    """Median milliseconds of one eager forward pass (batch 1, no grad)."""
    x = torch.randn(1, 3, size, size)
    times = []
    with torch.no_grad():
        for i in range(warmup + steps):
            start = time.perf_counter()
            forward(x)
            if i >= warmup:
                times.append(time.perf_counter() - start)
    return 1000 * sorted(times)[len(times) // 2]
