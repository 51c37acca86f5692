"""torch datasets over segflow dataset artifacts and over plain image folders."""

from __future__ import annotations

import re
import threading
from dataclasses import replace
from pathlib import Path

import cv2
import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from segflow.data import MAX_IMAGE_PIXELS
from segflow.data import manifest as manifest_lib
from segflow.data.transforms import (
    AugmentConfig,
    contrastive_pair,
    resize_for_eval,
    strong_augment,
    tile_crop,
    train_augment,
    weak_augment,
)
from segflow.errors import SegflowError
from segflow.storage import walk_files

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp"}


def image_error(exc: Exception) -> str:
    """Why an image could not be decoded, in words: no object reprs (``<_io.BytesIO object at
    0x...>``) and no file names (the caller names the file)."""
    if isinstance(exc, Image.UnidentifiedImageError):
        return "not an image file that can be decoded (unknown format, or damaged header)"
    text = re.sub(r"<[^<>]* at 0x[0-9a-f]+>", "the file", str(exc))
    return re.sub(r"'[^']*/[^']*'", "the file", text) or type(exc).__name__


_CV2_DECODE_PIXELS = 32_000_000  # above this, decode with OpenCV into one array (Pillow keeps two)
_pil_limit = threading.Lock()


def read_rgb(path: Path, max_pixels: int = MAX_IMAGE_PIXELS) -> np.ndarray:
    """An image file as HxWx3 uint8 RGB; refused before decoding when it has over ``max_pixels``."""
    try:
        with _pil_limit:
            previous = Image.MAX_IMAGE_PIXELS
            Image.MAX_IMAGE_PIXELS = None  # our own check below, with the caller's limit
            try:
                img = Image.open(path)
            finally:
                Image.MAX_IMAGE_PIXELS = previous
        with img:
            width, height = img.size
            if width * height > max_pixels:
                raise SegflowError(
                    f"{path}: {width} x {height} is {width * height:,} pixels, more than the limit of "
                    f"{max_pixels:,} (a guard against decompression bombs). If the image is genuine, raise the "
                    f"limit: --max-image-pixels {width * height}."
                )
            if width * height <= _CV2_DECODE_PIXELS:
                return np.asarray(img.convert("RGB"))
        # Straight into one array of the final size, in RGB: a plain imread would hold two copies.
        pixels = np.empty((height, width, 3), np.uint8)
        decoded = cv2.imread(str(path), pixels, cv2.IMREAD_COLOR_RGB | cv2.IMREAD_IGNORE_ORIENTATION)
        if decoded is None or decoded.shape != pixels.shape:
            raise OSError("OpenCV cannot decode it")
        return decoded
    except SegflowError:
        raise
    except Exception as exc:
        raise SegflowError(f"{path}: cannot read image: {image_error(exc)}.") from None


def to_tensor(image: np.ndarray, mean: np.ndarray, std: np.ndarray) -> torch.Tensor:
    """HxWx3 uint8 RGB -> 3xHxW float, normalised with the dataset's statistics."""
    return torch.from_numpy(((image.astype(np.float32) - mean) / std).transpose(2, 0, 1).copy())


def to_image(tensor: torch.Tensor, mean: np.ndarray, std: np.ndarray) -> np.ndarray:
    """The inverse of :func:`to_tensor`: 3xHxW normalised float -> HxWx3 uint8 RGB."""
    pixels = tensor.detach().float().cpu().numpy().transpose(1, 2, 0) * std + mean
    return np.clip(np.rint(pixels), 0, 255).astype(np.uint8)


class Normalization:
    def __init__(self, mean: list[float], std: list[float]) -> None:
        self.mean = np.asarray(mean, dtype=np.float32)
        self.std = np.maximum(np.asarray(std, dtype=np.float32), 1.0)

    def as_dict(self) -> dict:
        return {"mean": self.mean.tolist(), "std": self.std.tolist()}


class SegmentationDataset(Dataset):
    """One subset of a dataset artifact. Train mode augments; eval mode resizes images only.

    ``epoch`` is set by the training loop; with ``seed`` and the index it seeds each sample's
    augmentation, so batches do not depend on loader workers or on resuming. ``views``: each
    sample also carries two contrastive views of the image and its label map (SupCon).
    """

    def __init__(
        self,
        root: str | Path,
        subset: str,
        size: int,
        norm: Normalization,
        train: bool,
        seed: int = 0,
        augment: AugmentConfig | None = None,
        names: list[str] | None = None,
        square: bool = False,
        views: bool = False,
        tile_scale: float = 0.0,
    ) -> None:
        self.root = Path(root)
        manifest = manifest_lib.read(self.root)
        if subset not in manifest["subsets"]:
            raise SegflowError(f"{root} has no {subset!r} subset (it has {', '.join(manifest['subsets'])}).")
        self.labels: list[str] = manifest["labels"]
        by_name = {}
        for rel in manifest["files"]:
            parts = rel.split("/")
            if parts[0] == subset and parts[1] == "images":
                by_name[Path(parts[2]).stem] = self.root / rel
        self.names = sorted(names if names is not None else manifest["subsets"][subset]["items"])
        self.images = [by_name[n] for n in self.names]
        self.masks = [self.root / subset / "masks" / f"{n}.png" for n in self.names]
        self.size, self.norm, self.train, self.seed = size, norm, train, seed
        self.augment = augment or AugmentConfig()
        self.square = square  # eval images to exactly size x size (a fixed-shape export's input)
        self.views = views
        # Tiled training (tile_scale > 0): samples are size x size tiles cut from the full images at
        # tile_scale, half of them centred on a pixel of a class drawn with weight 1 / sqrt(its share).
        self.tile_scale = tile_scale
        self.focus = class_focus(manifest["subsets"][subset]["label_pixels"]) if tile_scale else None
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.names)

    def __getitem__(self, index: int) -> dict:
        original = read_rgb(self.images[index])
        labels = np.asarray(Image.open(self.masks[index]))
        rng = np.random.default_rng([self.seed, self.epoch, index])
        if self.train and self.tile_scale:
            focus = self.focus_pixel(rng, labels)
            tile, tile_mask = tile_crop(rng, original, labels, self.size, self.tile_scale, focus)
            inside_tile = replace(self.augment, scale_range=(1.0, 1.0))  # the tile is the crop
            image, mask = train_augment(rng, tile, tile_mask, self.size, inside_tile)
        elif self.train:
            image, mask = train_augment(rng, original, labels, self.size, self.augment)
        elif self.square:
            image, mask = cv2.resize(original, (self.size, self.size), interpolation=cv2.INTER_LINEAR), labels
        else:
            image, mask = resize_for_eval(original, self.size), labels
        item = {"image": self.tensor(image), "mask": _labels(mask), "index": index}
        if self.views:
            v1, m1, v2, m2 = contrastive_pair(rng, original, labels, self.size)
            item.update({"v1": self.tensor(v1), "m1": _labels(m1), "v2": self.tensor(v2), "m2": _labels(m2)})
        return item

    def tensor(self, image: np.ndarray) -> torch.Tensor:
        return to_tensor(image, self.norm.mean, self.norm.std)

    def focus_pixel(self, rng: np.random.Generator, labels: np.ndarray) -> tuple[int, int] | None:
        """Half the time, a random pixel of a class drawn by ``self.focus`` among those present."""
        if rng.random() < 0.5:
            return None
        present = np.flatnonzero(np.bincount(labels.ravel(), minlength=256)[: len(self.focus)])
        if not present.size:
            return None
        weights = self.focus[present] / self.focus[present].sum()
        chosen = rng.choice(present, p=weights)
        pixels = np.flatnonzero(labels.ravel() == chosen)
        return divmod(int(pixels[rng.integers(len(pixels))]), labels.shape[1])


def class_focus(label_pixels: list[int]) -> np.ndarray:
    """How often each class is chosen as a tile's centre: 1 / sqrt(its share of the labelled
    pixels), so rare classes are seen often without drowning the rest (absent classes: 0)."""
    pixels = np.asarray(label_pixels, dtype=np.float64)
    share = pixels / max(pixels.sum(), 1.0)
    return np.where(share > 0, 1 / np.sqrt(np.maximum(share, 1e-12)), 0.0)


def _labels(mask: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(mask.astype(np.int64))


def image_files(folder: str | Path) -> list[Path]:
    """Images below ``folder`` (recursive), sorted; skips our own ``detcon_mask`` folders."""
    folder = Path(folder)
    if not folder.is_dir():
        raise SegflowError(f"{folder} is not a folder of images.")
    files = [p for p in walk_files(folder, IMAGE_SUFFIXES) if "detcon_mask" not in p.relative_to(folder).parts]
    if not files:
        raise SegflowError(f"{folder} holds no images ({', '.join(sorted(IMAGE_SUFFIXES))}).")
    return files


class UnlabeledImages(Dataset):
    """A plain folder of images, geometrically augmented (Mean Teacher's weak view); with
    ``strong``, also the same crop recoloured and cut out (the student's view). ``evaluation``:
    resized only (shorter side to ``size``), the first ``limit`` images."""

    def __init__(
        self,
        folder: str | Path,
        size: int,
        norm: Normalization,
        seed: int = 0,
        augment: AugmentConfig | None = None,
        strong: bool = False,
        evaluation: bool = False,
        limit: int = 0,
    ) -> None:
        self.files = image_files(folder)[: limit or None]
        self.size, self.norm, self.seed, self.strong, self.evaluation = size, norm, seed, strong, evaluation
        self.augment = augment or AugmentConfig()
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> dict:
        if self.evaluation:
            image = resize_for_eval(read_rgb(self.files[index]), self.size)
            return {"image": to_tensor(image, self.norm.mean, self.norm.std), "index": index}
        rng = np.random.default_rng([self.seed, self.epoch, index, 1])
        image, _ = weak_augment(rng, read_rgb(self.files[index]), None, self.size, self.augment)
        item = {"image": to_tensor(image, self.norm.mean, self.norm.std), "index": index}
        if self.strong:
            item["strong"] = to_tensor(strong_augment(rng, image), self.norm.mean, self.norm.std)
        return item
