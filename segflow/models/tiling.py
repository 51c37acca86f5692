"""Tiled inference for images much larger than the model's input: overlapping tiles at native
resolution, logits blended across the overlaps, streamed one row of tiles at a time.

A model trained with tiling carries a :class:`Tiling` in its ``config.json`` (and an IR in its
rt_info), so evaluation, prediction, the MLflow pyfunc and the IR all tile the same way.

Memory: only one row of tiles' logits (C x tile x W floats) is held at once; finished image rows
leave as labels (uint8) and, when asked, entropy (float16). The full-resolution logits for all
classes never exist, which is what lets a 16000 x 16000 image be predicted on a laptop.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass

import cv2
import numpy as np
import torch

from segflow.data.datasets import Normalization
from segflow.errors import SegflowError
from segflow.models.outputs import entropy_map, probabilities, upsample

MIN_TILE, MAX_TILE = 32, 2048
OBJECT_TILE_RATIO = 0.03  # OTX's adaptive tiling: a typical object covers about 3% of a tile


@dataclass(frozen=True)
class Tiling:
    """``size``: tile side in model pixels (the model's input); ``overlap``: the share of a tile
    shared with its neighbour; ``scale``: images are resized by this factor before tiling (1.0:
    native resolution)."""

    size: int
    overlap: float = 0.25
    scale: float = 1.0

    @property
    def stride(self) -> int:
        return max(1, round(self.size * (1 - self.overlap)))

    @property
    def ramp(self) -> int:
        """Width of the blend ramp at a shared tile edge: the nominal overlap in pixels."""
        return self.size - self.stride

    def problems(self) -> list[str]:
        problems = []
        if isinstance(self.size, bool) or not isinstance(self.size, int) or not MIN_TILE <= self.size <= MAX_TILE:
            problems.append(f"the tile size (--tile) must be from {MIN_TILE} to {MAX_TILE} (got {self.size!r})")
        elif self.size % 32:
            problems.append(f"the tile size (--tile) must be a multiple of 32 (got {self.size})")
        if not _number(self.overlap) or not 0 <= self.overlap <= 0.75:
            problems.append(f"the tile overlap (--tile-overlap) must be from 0 to 0.75 (got {self.overlap!r})")
        if not _number(self.scale) or not 0.05 <= self.scale <= 4:
            problems.append(f"the tile scale (--tile-scale) must be from 0.05 to 4 (got {self.scale!r})")
        return problems

    def validate(self) -> Tiling:
        problems = self.problems()
        if problems:
            raise SegflowError("tiling settings are not valid: " + "; ".join(problems) + ".")
        return self

    def as_dict(self) -> dict:
        return asdict(self)


def _number(value) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def from_config(config: dict) -> Tiling | None:
    """The tiling a model config records (None: the model resizes whole images)."""
    settings = config.get("tiling")
    if settings is None:
        return None
    return Tiling(**settings)


def config_problems(settings) -> list[str]:
    """What is wrong with a config's ``tiling`` entry (for the artifact's config check)."""
    if settings is None:
        return []
    if not isinstance(settings, dict) or set(settings) != {"size", "overlap", "scale"}:
        return ["tiling must hold size, overlap and scale"]
    return Tiling(**settings).problems()


def tile_starts(length: int, size: int, stride: int) -> list[int]:
    """Tile origins along one axis: as few tiles as the stride allows, spread evenly so that the
    first starts at 0 and the last ends at ``length`` (one tile at 0 when the axis is shorter)."""
    if length <= size:
        return [0]
    count = math.ceil((length - size) / stride) + 1
    return [round(i * (length - size) / (count - 1)) for i in range(count)]


def blend_window(size: int, ramp: int, rise: bool, fall: bool) -> np.ndarray:
    """A tile's blend weights along one axis: a linear ramp over ``ramp`` pixels at an edge shared
    with a neighbour (``rise``: the start, ``fall``: the end), 1 at the image's own edges, so
    neighbouring tiles cross-fade instead of meeting at a hard seam."""
    window = np.ones(size, dtype=np.float32)
    if ramp < 2:
        return window
    ramp_values = (np.arange(ramp, dtype=np.float32) + 1) / (ramp + 1)
    if rise:
        window[:ramp] = np.minimum(window[:ramp], ramp_values)
    if fall:
        window[-ramp:] = np.minimum(window[-ramp:], ramp_values[::-1])
    return window


Run = Callable[[torch.Tensor], torch.Tensor]  # N x 3 x s x s normalised input -> N x C x s x s logits


def blended_rows(
    run: Run, image: np.ndarray, tiling: Tiling, mean: np.ndarray, std: np.ndarray, batch: int = 0
) -> Iterator[tuple[int, np.ndarray]]:
    """(first row, C x h x W blended logits) for consecutive bands of ``image`` (already at tiling
    scale and at least one tile in each dimension), each band finished: no later tile touches it.
    A band is a view of the rolling buffer, valid until the next band is asked for. ``batch``:
    tiles per forward pass; 0: about 0.25 MP of input (4 tiles of 256 px, 28 of 96 px)."""
    height, width = image.shape[:2]
    size, ramp = tiling.size, tiling.ramp
    batch = batch or min(32, max(1, 2**18 // size**2))
    ys, xs = tile_starts(height, size, tiling.stride), tile_starts(width, size, tiling.stride)
    x_windows = [blend_window(size, ramp, i > 0, i < len(xs) - 1) for i in range(len(xs))]
    acc = weight = None  # the band [ys[row], ys[row] + size) of weighted logits and weights
    for row, y in enumerate(ys):
        y_window = blend_window(size, ramp, row > 0, row < len(ys) - 1)
        for first in range(0, len(xs), batch):
            tiles = [image[y : y + size, x : x + size] for x in xs[first : first + batch]]
            x_in = torch.from_numpy(((np.stack(tiles).astype(np.float32) - mean) / std).transpose(0, 3, 1, 2))
            with torch.no_grad():
                logits = run(x_in.contiguous()).float().cpu().numpy()
            if acc is None:
                acc = np.zeros((logits.shape[1], size, width), dtype=np.float32)
                weight = np.zeros((size, width), dtype=np.float32)
            for x, tile_logits, x_window in zip(xs[first : first + batch], logits, x_windows[first:], strict=False):
                w = y_window[:, None] * x_window[None, :]
                acc[:, :, x : x + size] += tile_logits * w
                weight[:, x : x + size] += w
        done = (ys[row + 1] - y) if row + 1 < len(ys) else size
        np.divide(acc[:, :done], weight[:done], out=acc[:, :done])
        yield y, acc[:, :done]
        # Shift the finished rows out, in place, and clear the freed tail for the next tile row.
        acc[:, : size - done] = acc[:, done:]
        acc[:, size - done :] = 0
        weight[: size - done] = weight[done:]
        weight[size - done :] = 0


def segment_tiled(
    run: Run,
    image: np.ndarray,
    tiling: Tiling,
    mean: np.ndarray,
    std: np.ndarray,
    entropy: bool = False,
    batch: int = 0,
) -> tuple[np.ndarray, np.ndarray | None]:
    """Labels (H x W uint8) and, with ``entropy``, normalised entropy (H x W float16) of an RGB
    image, by tiled inference at the tiling's scale; both at the image's own size."""
    height, width = image.shape[:2]
    scaled = image
    if tiling.scale != 1.0:
        size = (max(1, round(width * tiling.scale)), max(1, round(height * tiling.scale)))
        scaled = cv2.resize(image, size, interpolation=cv2.INTER_AREA if tiling.scale < 1 else cv2.INTER_LINEAR)
    sh, sw = scaled.shape[:2]
    pad_h, pad_w = max(0, tiling.size - sh), max(0, tiling.size - sw)
    if pad_h or pad_w:  # smaller than one tile: pad with the mean colour (zero after normalisation)
        fill = tuple(float(v) for v in np.clip(np.rint(mean), 0, 255))
        scaled = cv2.copyMakeBorder(scaled, 0, pad_h, 0, pad_w, cv2.BORDER_CONSTANT, value=fill)
    labels = np.empty((sh, sw), dtype=np.uint8)
    uncertainty = np.empty((sh, sw), dtype=np.float16) if entropy else None
    for y, band in blended_rows(run, scaled, tiling, mean, std, batch):
        band = band[:, : max(0, min(band.shape[1], sh - y)), :sw]
        if band.shape[1] == 0:
            continue
        rows = slice(y, y + band.shape[1])
        for left in range(0, sw, 2048):  # in column blocks: small temporaries on very wide images
            cols = slice(left, left + 2048)
            labels[rows, cols] = band[:, :, cols].argmax(0)
            if uncertainty is not None:
                uncertainty[rows, cols] = _entropy(band[:, :, cols])
    if (sh, sw) != (height, width):
        labels = cv2.resize(labels, (width, height), interpolation=cv2.INTER_NEAREST)
        if uncertainty is not None:
            uncertainty = cv2.resize(uncertainty.astype(np.float32), (width, height)).astype(np.float16)
    return labels, uncertainty


def _entropy(logits: np.ndarray) -> np.ndarray:
    """Normalised entropy (0-1) of C x h x w logits."""
    return entropy_map(probabilities(torch.from_numpy(logits)[None]))[0].numpy()


# --- choosing a tile size from the data ---------------------------------------------------------


def auto_tiling(masks: list[np.ndarray], overlap: float = 0.25, scale: float = 1.0) -> Tiling | None:
    """OTX's adaptive rule: a tile in which the median object (a connected region of one class)
    covers about 3% of the area, as a multiple of 32 from 128 to 1024 pixels. None when the images
    are too small to hold two such tiles: whole-image training suits them better."""
    areas = []
    for mask in masks:
        if scale != 1.0:
            mask = cv2.resize(mask, None, fx=scale, fy=scale, interpolation=cv2.INTER_NEAREST)
        for value in np.unique(mask):
            if value == 255:
                continue
            count, _, stats, _ = cv2.connectedComponentsWithStats((mask == value).astype(np.uint8), connectivity=8)
            areas.extend(stats[1:count, cv2.CC_STAT_AREA].tolist())
    if not areas:
        return None
    side = math.sqrt(float(np.median(areas)) / OBJECT_TILE_RATIO)
    size = int(min(1024, max(128, round(side / 32) * 32)))
    longest = max(max(m.shape[:2]) for m in masks) * scale
    if longest < 2 * size:
        return None
    return Tiling(size, overlap, scale)


# --- one entry point for every runtime ----------------------------------------------------------


def segment_image(
    model, image: np.ndarray, config: dict, entropy: bool = False, device: torch.device | str = "cpu"
) -> tuple[np.ndarray, np.ndarray | None]:
    """Tiled labels (and entropy) of an RGB image with a Segmentor or an IR whose ``config``
    records its tiling: the one path evaluate, predict and the pyfunc share."""
    tiling = from_config(config)
    if tiling is None:
        raise SegflowError("this model was trained without tiling; it resizes whole images.")
    norm = Normalization(**config["normalization"])

    def run(x: torch.Tensor) -> torch.Tensor:
        return upsample(model(x.to(device)).logits, x.shape[-2:])

    with torch.no_grad():
        return segment_tiled(run, image, tiling, norm.mean, norm.std, entropy)
