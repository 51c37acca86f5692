"""Processes and devices: where this process stands in a torchrun launch, seeding, mixed precision."""

from __future__ import annotations

import os
import random
from contextlib import nullcontext

import numpy as np
import torch
from torch import nn


class Dist:
    """Where this process stands in a torchrun launch (a world of 1 otherwise). Reading it changes
    nothing; :meth:`start` joins the launch."""

    def __init__(self) -> None:
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        self.device = torch.device("cuda", self.local_rank) if torch.cuda.is_available() else torch.device("cpu")

    def start(self) -> Dist:
        """Join the launch: this process's GPU becomes the current one, and the process group opens
        (once per process; a world of 1 has none)."""
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        if self.world > 1 and not torch.distributed.is_initialized():
            torch.distributed.init_process_group("nccl" if self.device.type == "cuda" else "gloo")
        return self

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world > 1:
            torch.distributed.barrier()

    def sync_buffers(self, modules: list[nn.Module]) -> None:
        """Rank 0's buffers (BatchNorm statistics) everywhere. Each process updates them from its
        own batches; validation and the published weights must see one set, or the processes'
        scores, schedules and best epochs would drift apart."""
        if self.world == 1:
            return
        for module in modules:
            for buffer in module.buffers():
                torch.distributed.broadcast(buffer, src=0)

    def any(self, flag: bool) -> bool:
        """Whether ``flag`` is true in any process (every process gets the same answer)."""
        if self.world == 1:
            return flag
        value = torch.tensor([float(flag)], device=self.device)
        torch.distributed.all_reduce(value)
        return bool(value.item())

    def average_grads(self, params: list[nn.Parameter]) -> None:
        """Gradients of parameters outside DDP (heads, discriminators) averaged over processes."""
        if self.world == 1:
            return
        for p in params:
            if p.grad is not None:
                torch.distributed.all_reduce(p.grad)
                p.grad /= self.world


def is_main_process() -> bool:
    """Rank 0 of a torchrun launch, or a plain process: the one that writes and tracks."""
    return int(os.environ.get("RANK", "0")) == 0


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def autocast_for(amp: str, device: torch.device):
    """(context factory, GradScaler or None) for the configured mixed precision."""
    mode = amp
    if mode == "auto":
        mode = ("bf16" if torch.cuda.is_bf16_supported() else "fp16") if device.type == "cuda" else "off"
    if mode == "off":
        return nullcontext, None
    dtype = torch.bfloat16 if mode == "bf16" else torch.float16
    scaler = torch.amp.GradScaler(device.type) if mode == "fp16" and device.type == "cuda" else None
    return (lambda: torch.autocast(device.type, dtype=dtype)), scaler
