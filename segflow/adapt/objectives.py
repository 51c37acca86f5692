"""Adaptation objectives: what a step optimises when the labels are on the source domain only.

Each one sees a source batch (images and labels, the engine's main data) and a target batch (the
``target`` stream: images only), and runs the network once on both (concatenated, so DDP sees one
forward). They share the segmentation loss on the source, and differ in what they ask of the
target predictions:

- ``Adversarial``: discriminators learn to tell source outputs from target outputs, and the
  segmenter learns to fool them. AdaptSegNet shows them the softmax; AdvEnt (ADVENT) the weighted
  self-information map -P log P / log C. ``multi`` levels adds the auxiliary output, with its own
  discriminator. The discriminators are a part with their own optimiser (engine ``Part``).
- ``MinEnt``: the normalised entropy of target predictions is minimised.
- ``DACS``: ClassMix: half the classes of each source image are pasted onto a target image; the
  label is the source's there and an EMA teacher's pseudo-label elsewhere, weighted by the
  teacher's confidence (per pixel, or the paper's per-image share of confident pixels). The student
  sees the mixed image recoloured and blurred.
- ``SourceOnly``: the control: the same steps on source batches alone.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from segflow.adapt.config import AdaptConfig
from segflow.data import IGNORE_INDEX
from segflow.data.datasets import Normalization, to_image, to_tensor
from segflow.data.transforms import mixed_view
from segflow.models.discriminator import OutputDiscriminator
from segflow.models.outputs import entropy_map, probabilities, pseudo_labels, self_information
from segflow.train.objective import Objective, Part, Step, Stream, ema_update, frozen_copy

SOURCE, TARGET = 0.0, 1.0  # the discriminators' labels


def cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.float(), labels, ignore_index=IGNORE_INDEX)


def bce(logits: torch.Tensor, label: float) -> torch.Tensor:
    return F.binary_cross_entropy_with_logits(logits.float(), torch.full_like(logits.float(), label))


@contextlib.contextmanager
def fixed(module: nn.Module) -> Iterator[None]:
    """``module``'s parameters take no gradient inside: the segmenter's adversarial loss flows
    through a discriminator without training it."""
    flags = [p.requires_grad for p in module.parameters()]
    module.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in zip(module.parameters(), flags, strict=True):
            p.requires_grad_(flag)


class TwoDomains(Objective):
    """The source segmentation loss (+ the auxiliary output's, weighted) and the target stream."""

    def __init__(self, cfg: AdaptConfig, target: Stream) -> None:
        self.cfg = cfg
        self.target = target

    def streams(self) -> dict[str, Stream]:
        return {"target": self.target}

    def forward(self, net, batch) -> tuple:
        """(outputs on source + target, number of source images, source segmentation loss)."""
        source, labels = batch["image"], batch["mask"]
        n = source.shape[0]
        out = net(torch.cat([source, batch["target"]["image"]]), with_aux=self.cfg.multi_level)
        seg = cross_entropy(out.logits[:n], labels)
        if self.cfg.multi_level:
            seg = seg + self.cfg.seg_aux_weight * cross_entropy(out.aux_logits[:n], labels)
        return out, n, seg

    def levels(self, out, weight: float) -> list[tuple[str, torch.Tensor, float]]:
        """(name, logits, loss weight) of the outputs the method acts on: ``weight`` on the main
        output, ``aux_ratio`` of it on the auxiliary."""
        levels = [("main", out.logits, weight)]
        if self.cfg.multi_level:
            levels.append(("aux", out.aux_logits, weight * self.cfg.aux_ratio))
        return levels


class SourceOnly(TwoDomains):
    """The control: the same optimiser and steps, on source batches only."""

    name = "source"

    def streams(self) -> dict[str, Stream]:
        return {}

    def loss(self, net, batch, step):
        seg = cross_entropy(net(batch["image"]).logits, batch["mask"])
        return seg, {"seg": seg.item()}


class MinEnt(TwoDomains):
    name = "minent"

    def loss(self, net, batch, step):
        out, n, seg = self.forward(net, batch)
        levels = self.levels(out, self.cfg.ent_weight)
        entropies = [(weight, entropy_map(probabilities(logits[n:])).mean()) for _, logits, weight in levels]
        total = seg + sum(weight * entropy for weight, entropy in entropies)
        return total, {"seg": seg.item(), "target_entropy": entropies[0][1].item()}


class Adversarial(TwoDomains):
    """AdaptSegNet (``maps="softmax"``) or AdvEnt (``maps="self_information"``)."""

    def __init__(self, cfg: AdaptConfig, target: Stream, num_classes: int, maps: str) -> None:
        super().__init__(cfg, target)
        self.name = "adaptsegnet" if maps == "softmax" else "advent"
        self.maps = maps
        self.num_classes = num_classes
        self.discriminators: dict[str, nn.Module] = {}
        self._parts: list[Part] = []

    def setup(self, model, device):
        names = ["main", "aux"] if self.cfg.multi_level else ["main"]
        self.discriminators = {n: OutputDiscriminator(self.num_classes, self.cfg.disc_width) for n in names}
        super().setup(model, device)
        params = [p for d in self.discriminators.values() for p in d.parameters()]
        self._parts = [Part("discriminator", params, self.cfg.disc_recipe())]

    def modules(self) -> dict[str, nn.Module]:
        return {f"disc_{name}": d for name, d in self.discriminators.items()}

    def parts(self) -> list[Part]:
        return self._parts

    def map(self, logits: torch.Tensor) -> torch.Tensor:
        probs = probabilities(logits)
        maps = probs if self.maps == "softmax" else self_information(probs)
        pool = self.cfg.disc_pool
        while pool > 1 and min(maps.shape[-2:]) < 32 * pool:
            pool //= 2
        return F.avg_pool2d(maps, pool, ceil_mode=True) if pool > 1 else maps

    def loss(self, net, batch, step):
        out, n, seg = self.forward(net, batch)
        adversarial = disc_loss = 0.0
        accuracy = []
        for name, logits, weight in self.levels(out, self.cfg.adversarial_weight):
            disc = self.discriminators[name]
            maps = self.map(logits)
            with fixed(disc):  # the segmenter wants target outputs to pass for source ones
                adversarial = adversarial + weight * bce(disc(maps[n:]), SOURCE)
            on_source, on_target = disc(maps[:n].detach()), disc(maps[n:].detach())
            disc_loss = disc_loss + 0.5 * (bce(on_source, SOURCE) + bce(on_target, TARGET))
            accuracy.append(0.5 * ((on_source < 0).float().mean() + (on_target > 0).float().mean()))
        entropy = entropy_map(probabilities(out.logits[n:].detach())).mean()
        logs = {
            "seg": seg.item(),
            "adv": float(adversarial.detach()),
            "disc": float(disc_loss.detach()),
            "disc_accuracy": float(accuracy[0]),
            "target_entropy": entropy.item(),
        }
        return {"model": seg + adversarial, "discriminator": disc_loss}, logs


def classmix_masks(labels: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Per image, the pixels of half its classes (chosen at random, rounded up): N x H x W bool."""
    masks = torch.zeros_like(labels, dtype=torch.bool)
    for i, label in enumerate(labels):
        classes = torch.unique(label[label != IGNORE_INDEX])
        if len(classes) == 0:
            continue
        pick = torch.randperm(len(classes), generator=generator)[: math.ceil(len(classes) / 2)]
        masks[i] = torch.isin(label, classes[pick.to(classes.device)])
    return masks


def pseudo_label_weights(confidence: torch.Tensor, confident: torch.Tensor, weighting: str) -> torch.Tensor:
    """The loss weight of each pseudo-labelled target pixel (N x H x W), from the teacher's
    probability of each pseudo-label (``confidence``) and which pixels pass the threshold:

    - ``pixel``: the teacher's probability of the pixel's own pseudo-label;
    - ``image``: the DACS paper's: one weight per image, the share of its pixels that pass the
      threshold (``AdaptConfig.confidence``).

    At the paper's threshold the source model is sure of only 9-16% of a synthetic target image,
    so ``image`` gives each pseudo-label about a tenth of a source label's weight and the teacher
    barely teaches: 3 seeds, +3.0 mIoU over source-only against +4.8 for ``pixel`` (RESULTS.md,
    "Domain adaptation"). A flat weight of 1 scored as ``pixel`` did, so what counts is the
    weight's size; ``pixel`` is kept because it still discounts the pixels the teacher doubts.
    """
    if weighting == "pixel":
        return confidence
    return confident.float().mean((1, 2), keepdim=True).expand(confident.shape)


class DACS(TwoDomains):
    name = "dacs"

    def __init__(self, cfg: AdaptConfig, target: Stream, norm: Normalization) -> None:
        super().__init__(cfg, target)
        self.norm = norm
        self.teacher: nn.Module | None = None

    def setup(self, model, device):
        super().setup(model, device)
        self.teacher = frozen_copy(model)

    def frozen(self) -> dict[str, nn.Module]:
        return {"teacher": self.teacher}

    def loss(self, net, batch, step: Step):
        source, labels, target = batch["image"], batch["mask"], batch["target"]["image"]
        n = source.shape[0]
        with torch.no_grad():
            self.teacher.eval()
            pseudo, confidence = pseudo_labels(self.teacher(target).logits)
            confident = confidence >= self.cfg.confidence
            target_weight = pseudo_label_weights(confidence, confident, self.cfg.mix_weighting)
            mask = classmix_masks(labels, step.generator(11))
            mixed = torch.where(mask[:, None], source, target)
            if self.cfg.mix_augment:
                mixed = self.augment(mixed, step.generator(12))
            mixed_labels = torch.where(mask, labels, pseudo)
            weights = torch.where(mask, torch.ones_like(target_weight), target_weight)
        logits = net(torch.cat([source, mixed])).logits
        seg = cross_entropy(logits[:n], labels)
        per_pixel = F.cross_entropy(logits[n:].float(), mixed_labels, ignore_index=IGNORE_INDEX, reduction="none")
        valid = (mixed_labels != IGNORE_INDEX).float()
        mix = (per_pixel * weights * valid).sum() / valid.sum().clamp_min(1)
        logs = {"seg": seg.item(), "mix": mix.item(), "confident_share": confident.float().mean().item()}
        return seg + mix, logs

    def augment(self, images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """Each mixed image through the shared numpy recipe on the CPU: a small share of a CPU
        step, but on a GPU at 512 px (a host round trip per batch) the first thing to move onto
        the device (benchmarks/RESULTS.md, "Adaptation step cost")."""
        rng = torch.randint(2**31, (1,), generator=generator).item()
        rngs = [np.random.default_rng((rng, i)) for i in range(len(images))]
        mean, std = self.norm.mean, self.norm.std
        views = [to_tensor(mixed_view(r, to_image(x, mean, std)), mean, std) for r, x in zip(rngs, images, strict=True)]
        return torch.stack(views).to(images.device, images.dtype)

    def after_step(self, net, step):
        ema_update(self.teacher, net, self.cfg.ema_momentum)


def make_objective(cfg: AdaptConfig, num_classes: int, target: Stream, norm: Normalization) -> Objective:
    if cfg.method == "adaptsegnet":
        return Adversarial(cfg, target, num_classes, "softmax")
    if cfg.method == "advent":
        return Adversarial(cfg, target, num_classes, "self_information")
    if cfg.method == "minent":
        return MinEnt(cfg, target)
    if cfg.method == "dacs":
        return DACS(cfg, target, norm)
    return SourceOnly(cfg, target)
