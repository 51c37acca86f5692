"""Settings of ``segflow adapt``. Loss weights, discriminator and optimiser follow the papers:

- AdaptSegNet (Tsai et al., CVPR 2018): segmentation on source (+ 0.1 x auxiliary output),
  adversarial on target with lambda 0.001 (main) / 0.0002 (auxiliary); discriminators Adam 1e-4,
  betas (0.9, 0.99), poly decay 0.9.
- ADVENT (Vu et al., CVPR 2019): MinEnt weights the normalised target entropy by 0.001 / 0.0002;
  AdvEnt feeds the discriminator weighted self-information maps instead of softmax.
- DACS (Tranheden et al., WACV 2021): ClassMix, an EMA teacher (0.99), pixel weight = the share of
  the teacher's pixels above 0.968 confidence (``mix_weighting="image"``; the default here weights
  each pixel by the teacher's own confidence); the mixed images are colour-jittered and blurred.

The papers train DeepLab-v2 from ImageNet for 100k+ iterations; here a Lite-HRNet already trained
on the source is adapted for a short run, so the segmenter's optimiser and the adversarial and
entropy weights (x10 to x1000 the papers', same main / auxiliary ratio) are the settings this
project tuned on its synthetic shift (benchmarks/domain_adaptation.py and RESULTS.md say which,
and why).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from segflow.adapt.selection import SELECT_CHOICES
from segflow.configs import check_numbers
from segflow.errors import SegflowError
from segflow.models import check_input_size, check_name
from segflow.train.config import check_loop
from segflow.train.loop import LoopConfig
from segflow.train.objective import Recipe

METHODS = ("adaptsegnet", "minent", "advent", "dacs", "source")
# The adversarial weight on the main output by method, each the best of a sweep on the synthetic
# shift (benchmarks/RESULTS.md, "Domain adaptation"): at AdvEnt's 0.1, AdaptSegNet fell below
# source-only, at 0.01 it is level or above.
ADV_WEIGHTS = {"adaptsegnet": 0.01, "advent": 0.1}


@dataclass(frozen=True)
class AdaptConfig:
    source: str  # labelled dataset artifact
    target: str  # unlabelled images, or a dataset artifact whose labels serve validation only
    init: str  # model folder to start from (trained on the source)
    out: str
    method: str = "adaptsegnet"
    levels: str = "multi"  # AdaptSegNet / AdvEnt / MinEnt: the main output only, or also the auxiliary
    model: str = ""  # default: the --init model's architecture
    iterations: int = 1000
    eval_every: int = 100  # a snapshot is scored (and maybe kept) every this many iterations
    batch_size: int = 8
    input_size: int = 0  # 0: the size the --init model was trained at
    seed: int = 0
    # The segmenter: Adam with poly decay (see the module's docstring).
    lr: float = 1e-4
    weight_decay: float = 0.0
    poly_power: float = 0.9
    clip_norm: float = 40.0
    seg_aux_weight: float = 0.1
    # Discriminators (AdaptSegNet, AdvEnt).
    disc_lr: float = 1e-4
    disc_width: int = 64
    # The maps a discriminator reads are average-pooled by this factor first (halved while the pooled
    # map would be under 32 px, the least its five stride-2 convolutions take): Lite-HRNet predicts
    # at 1/4 of the input, so pooling by 4 loses little, and the discriminators then cost 1/16.
    disc_pool: int = 4
    # Loss weights on the main output; the auxiliary output (multi-level) gets aux_ratio of them, the
    # papers' 0.0002 / 0.001. The papers' main weights are 0.001 (adversarial and entropy); these are
    # 10x (AdaptSegNet), 100x (AdvEnt) and 1000x (MinEnt) that, the best of sweeps on the synthetic
    # shift (RESULTS.md, "Domain adaptation"): the papers run 100k+ steps from ImageNet weights, a
    # short run from a source model needs a stronger pull, and beyond these the target term starts
    # to undo the source training.
    adv_weight: float | None = None  # AdaptSegNet, AdvEnt; None: the method's, ADV_WEIGHTS
    ent_weight: float = 1.0  # MinEnt
    aux_ratio: float = 0.2
    # DACS.
    ema_momentum: float = 0.99
    confidence: float = 0.968
    # How a pseudo-labelled pixel is weighted: "pixel" by the teacher's probability of its label,
    # or "image", the paper's share of the image's pixels above `confidence` (objectives.py says why).
    mix_weighting: str = "pixel"
    mix_augment: bool = True  # DACS: recolour and blur the mixed images (the paper's augmentation)
    validation_images: int = 64  # target (and source val) images each snapshot is measured on
    # Which number chooses the snapshot: "auto" (target val mDice when the target dataset has a val
    # subset, else the label-free default), "labels", "label-free", or a criterion of selection.py.
    select: str = "auto"
    amp: str = "auto"
    channels_last: str = "auto"
    loader_workers: int = -1  # -1: auto (segflow.train.loop.loader_workers)
    resume: bool = False
    overwrite: bool = False
    checkpoint_dir: str = ""  # local folder or s3:// prefix; default: beside OUT (see storage.Checkpoints)

    RESUME_MAY_CHANGE = ("resume", "overwrite", "loader_workers", "checkpoint_dir", "out")

    @property
    def multi_level(self) -> bool:
        return self.levels == "multi" and self.method in ("adaptsegnet", "advent", "minent")

    @property
    def adversarial_weight(self) -> float:
        """--adv-weight if given, else the method's tuned default."""
        return self.adv_weight if self.adv_weight is not None else ADV_WEIGHTS.get(self.method, 0.0)

    def validate(self) -> None:
        check_numbers(self)
        if self.method not in METHODS:
            raise SegflowError(f"--method {self.method!r} is not known: choose one of {', '.join(METHODS)}.")
        if self.select not in SELECT_CHOICES:
            raise SegflowError(f"--select {self.select!r} is not known: choose one of {', '.join(SELECT_CHOICES)}.")
        if self.mix_weighting not in ("pixel", "image"):
            raise SegflowError(f"--mix-weighting must be pixel or image (got {self.mix_weighting!r}).")
        if self.levels not in ("single", "multi"):
            raise SegflowError(f"--levels must be single or multi (got {self.levels!r}).")
        if self.model:
            check_name(self.model)
        if self.input_size:
            check_input_size(self.input_size)
        check_loop(1, self.batch_size, self.amp, self.channels_last)
        checks = [
            (self.iterations >= 1, "--iterations must be at least 1"),
            (self.eval_every >= 1, "--eval-every must be at least 1"),
            (self.lr > 0 and self.disc_lr > 0, "--lr and --disc-lr must be positive"),
            (self.disc_width >= 1 and self.disc_pool >= 1, "--disc-width and --disc-pool must be at least 1"),
            (0 < self.confidence < 1, "--confidence must be between 0 and 1"),
            (
                self.adversarial_weight >= 0 and self.ent_weight >= 0,
                "--adv-weight and --ent-weight must not be negative",
            ),
        ]
        for ok, message in checks:
            if not ok:
                raise SegflowError(f"{message}.")

    def loop(self) -> LoopConfig:
        """Snapshots of ``eval_every`` iterations; ``iterations`` is rounded up to whole snapshots."""
        every = min(self.eval_every, self.iterations)
        return LoopConfig(
            epochs=math.ceil(self.iterations / every),
            batch_size=self.batch_size,
            seed=self.seed,
            iters_per_epoch=every,
            exact_iters=True,
            amp=self.amp,
            channels_last=self.channels_last,
            loader_workers=self.loader_workers,
            resume=self.resume,
            overwrite=self.overwrite,
        )

    def recipe(self) -> Recipe:
        return Recipe(
            optimizer="adam",
            lr=self.lr,
            weight_decay=self.weight_decay,
            poly_power=self.poly_power,
            clip_norm=self.clip_norm,
        )

    def disc_recipe(self) -> Recipe:
        return Recipe(optimizer="adam", lr=self.disc_lr, betas=(0.9, 0.99), poly_power=self.poly_power)
