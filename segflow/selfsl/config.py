"""DetCon pretraining's settings, and the rules that choose the ones left at 0 (auto) from the images
and the step budget."""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields, replace
from pathlib import Path

from segflow.configs import check_numbers
from segflow.errors import SegflowError
from segflow.models import check_input_size, check_name
from segflow.selfsl.pseudo_masks import FelzenszwalbParams, median_side
from segflow.train.config import check_loop
from segflow.train.loop import LoopConfig
from segflow.train.objective import Recipe


@dataclass(frozen=True)
class PretrainConfig:
    images: str
    out: str
    model: str = "lite_hrnet_s"
    epochs: int = 10
    batch_size: int = 16
    input_size: int = 0  # view side; 0: auto (see auto_settings)
    seed: int = 0
    lr: float = 0.0  # SGD, momentum 0.9, weight decay 1e-3 (OTX DetCon recipe); 0: auto
    momentum: float = 0.9
    weight_decay: float = 1e-3
    temperature: float = 0.1
    ema_momentum: float = 0.996
    num_masks: int = 16  # regions sampled per image
    iters_per_epoch: int = 0  # at least this many steps per epoch; 0: auto (see auto_settings)
    masks: str = ""  # pseudo-mask folder; default: detcon_mask/ beside the images
    felzenszwalb: FelzenszwalbParams = field(default_factory=FelzenszwalbParams)
    amp: str = "auto"
    channels_last: str = "auto"
    loader_workers: int = -1  # -1: auto (segflow.train.loop.loader_workers)
    resume: bool = False
    overwrite: bool = False
    checkpoint_dir: str = ""  # local folder or s3:// prefix; default: beside OUT (see storage.Checkpoints)

    RESUME_MAY_CHANGE = ("epochs", "resume", "overwrite", "loader_workers", "checkpoint_dir", "out")

    def validate(self) -> None:
        check_numbers(self)
        check_name(self.model)
        if self.input_size:
            check_input_size(self.input_size)
        check_loop(self.epochs, self.batch_size, self.amp, self.channels_last)
        if self.lr < 0:
            raise SegflowError("--lr must be positive (or 0 / auto).")

    def loop(self) -> LoopConfig:
        return LoopConfig(**{f.name: getattr(self, f.name) for f in fields(LoopConfig) if hasattr(self, f.name)})

    def recipe(self) -> Recipe:
        return Recipe(optimizer="sgd", lr=self.lr, momentum=self.momentum, weight_decay=self.weight_decay)


# OTX's DetCon recipe (224 px views, lr 1e-3) is for long runs on large images. A short run on a
# few hundred small images needs views no larger than the images and a much larger step: lr 0.05
# for 20 epochs on 96 images at 96 px gave +9.5 test mDice where 1e-3 gave nothing (the label
# efficiency benchmark). The rule keeps 0.05 up to 1000 steps and shrinks it with the square root
# of the step budget beyond, to OTX's 1e-3 at the longest runs.


MAX_VIEW = 224


SHORT_RUN_STEPS = 1000
# DetCon's gain keeps growing with the number of steps long after a few hundred images have been
# seen many times: on 96 unlabelled 96 px images (6 steps a pass), 8 labels, the gain over
# supervised went +3.2 / +3.1 / +5.0 (indoor) and +4.0 / +8.3 / +16.0 (street) at 120 / 240 / 480
# steps (RESULTS.md). So on small sets an epoch is at least this many steps (the images repeat),
# and the usual 20 epochs are 1000 steps; sets of 800+ images (batch 16) are not affected.


MIN_STEPS_PER_EPOCH = 50


def auto_settings(cfg: PretrainConfig, files: list[Path]) -> tuple[PretrainConfig, dict]:
    """Fill the settings left at 0 (``auto``) from the images; return the config and what was chosen."""
    chosen: dict = {}
    if not cfg.input_size:
        side = median_side(files)
        size = max(32, min(MAX_VIEW, side // 32 * 32))
        cfg = replace(cfg, input_size=size)
        chosen["input_size"] = size
        chosen["input_size_rule"] = f"median short side {side} px, floored to a multiple of 32, at most {MAX_VIEW}"
    batch = min(cfg.batch_size, len(files))
    one_pass = max(len(files) // max(batch, 1), 1)
    if not cfg.iters_per_epoch:
        cfg = replace(cfg, iters_per_epoch=max(one_pass, MIN_STEPS_PER_EPOCH))
        chosen["iters_per_epoch"] = cfg.iters_per_epoch
        chosen["iters_per_epoch_rule"] = f"one pass ({one_pass} steps) or {MIN_STEPS_PER_EPOCH}, the larger"
    if not cfg.lr:
        steps = cfg.epochs * max(cfg.iters_per_epoch, one_pass)
        lr = 0.05 if steps <= SHORT_RUN_STEPS else max(1e-3, 0.05 * math.sqrt(SHORT_RUN_STEPS / steps))
        cfg = replace(cfg, lr=round(lr, 5))
        chosen["lr"] = cfg.lr
        chosen["lr_rule"] = f"{steps} SGD steps: 0.05 up to {SHORT_RUN_STEPS}, then 0.05*sqrt({SHORT_RUN_STEPS}/steps)"
    return cfg, chosen
