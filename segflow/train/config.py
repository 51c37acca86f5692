"""Training settings. Defaults are the OTX supervised recipe, scaled to CPU.

Method choice lives here too (:func:`method_settings`), so that the command line and the KFP
component choose and check it the same way.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

from segflow.configs import check_numbers
from segflow.errors import SegflowError
from segflow.models import check_input_size, check_name
from segflow.models.tiling import Tiling
from segflow.train.loop import LoopConfig
from segflow.train.objective import Recipe


@dataclass(frozen=True)
class SupConConfig:
    """DetCon-style contrastive branch beside the segmentation head; masks are the labels."""

    weight: float = 1.0
    every: int = 5  # contrastive views every Nth iteration
    num_masks: int = 16  # masks sampled per image
    temperature: float = 0.1
    ema_momentum: float = 0.996


@dataclass(frozen=True)
class MeanTeacherConfig:
    """A confidence-thresholded EMA teacher (FixMatch / UniMatch style semi-supervision)."""

    unlabeled: str = ""  # folder of plain images (local or s3://)
    weight: float = 1.0  # unsupervised loss weight once ramped up
    ema_momentum: float = 0.99
    confidence: float = 0.9  # only teacher pixels at least this sure become pseudo-labels
    warmup_steps: int = -1  # supervised-only steps first; -1: a third of all steps
    ramp_steps: int = -1  # then the unsupervised weight grows linearly over this many; -1: a fifth of all steps
    unlabeled_batch_size: int = 0  # 0: same as the labelled batch

    def validate(self) -> None:
        checks = [
            (0 < self.confidence < 1, "Mean Teacher confidence must be between 0 and 1"),
            (self.weight >= 0, "Mean Teacher weight must be 0 or more"),
            (0 <= self.ema_momentum < 1, "Mean Teacher EMA momentum must be in [0, 1)"),
            (self.warmup_steps >= -1 and self.ramp_steps >= -1, "warm-up and ramp steps must be -1 (auto) or more"),
        ]
        for ok, message in checks:
            if not ok:
                raise SegflowError(f"{message}.")


METHODS = ("supervised", "supcon", "mean_teacher")


def method_settings(method: str, unlabeled: str = "") -> dict:
    """TrainConfig fields for a method named by a string: the one place that checks the choice."""
    if method not in METHODS:
        raise SegflowError(f"method {method!r} is not known: choose one of {', '.join(METHODS)}.")
    if method == "mean_teacher" and not unlabeled:
        raise SegflowError("method mean_teacher needs unlabelled images: pass --unlabeled IMAGES (a folder).")
    if unlabeled and method != "mean_teacher":
        raise SegflowError(f"unlabelled images ({unlabeled}) are only used by method mean_teacher, not {method}.")
    return {
        "supcon": SupConConfig() if method == "supcon" else None,
        "mean_teacher": MeanTeacherConfig(unlabeled=unlabeled) if method == "mean_teacher" else None,
    }


@dataclass(frozen=True)
class TrainConfig:
    data: str
    out: str
    model: str = "lite_hrnet_s"
    epochs: int = 30
    batch_size: int = 8
    input_size: int = 256
    seed: int = 0
    lr: float = 1e-3
    weight_decay: float = 0.0
    clip_norm: float = 40.0
    warmup_iters: int = 100  # linear warmup (at most a fifth of all iterations) ...
    warmup_ratio: float = 1 / 3
    plateau_patience: int = 4  # ... then ReduceLROnPlateau on val mDice
    plateau_factor: float = 0.1
    min_lr: float = 1e-6
    early_stop_patience: int = 8
    early_stop_min_delta: float = 0.001
    early_stop_start: int = 3  # no early stop before this epoch
    loader_workers: int = -1  # -1: auto (segflow.train.loop.loader_workers)
    resume: bool = False
    overwrite: bool = False
    checkpoint_dir: str = ""  # local folder or s3:// prefix; default: beside OUT (see storage.Checkpoints)
    init_backbone: str = ""  # folder of DetCon-pretrained backbone weights
    init_model: str = ""  # a segflow model folder: start from all its weights (fine-tune a champion)
    amp: str = "auto"  # auto: bf16 (or fp16) on CUDA, off on CPU; or off / bf16 / fp16
    channels_last: str = "auto"  # auto: on for CUDA
    labeled_subset: str = "train"
    max_labeled: int = 0  # use only the first N labelled images (label-efficiency studies); 0 = all
    iters_per_epoch: int = 0  # at least this many steps per epoch (tiny labelled sets); 0 = one pass
    tile: int = 0  # large images: train and infer on tiles of this side (the model's input); 0 off, -1 auto
    tile_overlap: float = 0.25  # share of a tile shared with its neighbour at inference
    tile_scale: float = 1.0  # images are resized by this factor before tiling (1: native resolution)
    supcon: SupConConfig | None = None
    mean_teacher: MeanTeacherConfig | None = None

    # Settings a resumed run may change: how long it runs and where files are, not what it computes.
    RESUME_MAY_CHANGE = (
        "epochs",
        "early_stop_patience",
        "resume",
        "overwrite",
        "loader_workers",
        "checkpoint_dir",
        "out",
    )

    @property
    def method(self) -> str:
        return "supcon" if self.supcon else "mean_teacher" if self.mean_teacher else "supervised"

    def validate(self) -> None:
        check_numbers(self)
        check_name(self.model)
        check_input_size(self.input_size)
        check_loop(self.epochs, self.batch_size, self.amp, self.channels_last)
        checks = [
            (self.lr > 0, "--lr must be positive"),
            (self.max_labeled >= 0, "--max-labeled must be 0 (all) or more"),
            (self.iters_per_epoch >= 0, "--iters-per-epoch must be 0 (one pass) or more"),
            (not (self.init_backbone and self.init_model), "--init-backbone and --init-model exclude each other"),
        ]
        for ok, message in checks:
            if not ok:
                raise SegflowError(f"{message}.")
        if self.tile:
            if self.tile != -1:
                Tiling(self.tile, self.tile_overlap, self.tile_scale).validate()
            else:
                Tiling(256, self.tile_overlap, self.tile_scale).validate()  # overlap and scale only
            if self.method != "supervised":
                raise SegflowError(f"--tile works with --method supervised only (not {self.method}).")
        if self.mean_teacher is not None and not self.mean_teacher.unlabeled:
            raise SegflowError("--method mean_teacher needs --unlabeled IMAGES: a folder of unlabelled images.")
        if self.mean_teacher is not None:
            self.mean_teacher.validate()
        if self.supcon is not None and self.mean_teacher is not None:
            raise SegflowError("SupCon and Mean Teacher cannot be combined; choose one --method.")

    def loop(self) -> LoopConfig:
        return LoopConfig(**{f.name: getattr(self, f.name) for f in fields(LoopConfig) if hasattr(self, f.name)})

    def recipe(self) -> Recipe:
        return Recipe(
            optimizer="adam",
            lr=self.lr,
            weight_decay=self.weight_decay,
            warmup_iters=self.warmup_iters,
            warmup_ratio=self.warmup_ratio,
            plateau_patience=self.plateau_patience,
            plateau_factor=self.plateau_factor,
            min_lr=self.min_lr,
            clip_norm=self.clip_norm,
        )


def check_loop(epochs: int, batch_size: int, amp: str = "auto", channels_last: str = "auto") -> None:
    """Settings every training command shares."""
    checks = [
        (epochs >= 1, "--epochs must be at least 1"),
        (batch_size >= 2, "--batch-size must be at least 2 (batch norm and contrast need two samples)"),
        (amp in ("auto", "off", "bf16", "fp16"), "--amp must be auto, off, bf16 or fp16"),
        (channels_last in ("auto", "on", "off"), "--channels-last must be auto, on or off"),
    ]
    for ok, message in checks:
        if not ok:
            raise SegflowError(f"{message}.")
