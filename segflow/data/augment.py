"""Training augmentations (the OTX supervised recipe), on numpy arrays with OpenCV.

Every random choice comes from the Generator passed in, which the dataset derives from
(seed, epoch, index): the same run gives the same batches, with any number of loader workers,
and a resumed run continues exactly where the killed one stopped.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

from segflow.data import IGNORE_INDEX


@dataclass(frozen=True)
class AugmentConfig:
    scale_range: tuple[float, float] = (0.5, 2.0)  # random resize around the crop size
    flip_p: float = 0.5
    rotate_p: float = 0.5
    max_rotate: float = 30.0
    photometric_p: float = 1.0
    mix_p: float = 0.5  # "mixing images": two photometric variants blended through a noise mask


def random_resize_crop(
    rng: np.random.Generator, image: np.ndarray, mask: np.ndarray | None, size: int, scale_range: tuple[float, float]
) -> tuple[np.ndarray, np.ndarray | None]:
    """Resize so the shorter side is ``size * U(scale_range)``, then a random ``size`` crop (padded)."""
    h, w = image.shape[:2]
    scale = size * rng.uniform(*scale_range) / min(h, w)
    nh, nw = max(1, round(h * scale)), max(1, round(w * scale))
    image = cv2.resize(image, (nw, nh), interpolation=cv2.INTER_LINEAR)
    if mask is not None:
        mask = cv2.resize(mask, (nw, nh), interpolation=cv2.INTER_NEAREST)
    if nh < size or nw < size:  # pad: image with 0, mask with ignore
        ph, pw = max(size - nh, 0), max(size - nw, 0)
        image = cv2.copyMakeBorder(image, 0, ph, 0, pw, cv2.BORDER_CONSTANT, value=(0, 0, 0))
        if mask is not None:
            mask = cv2.copyMakeBorder(mask, 0, ph, 0, pw, cv2.BORDER_CONSTANT, value=IGNORE_INDEX)
        nh, nw = image.shape[:2]
    y = int(rng.integers(0, nh - size + 1))
    x = int(rng.integers(0, nw - size + 1))
    image = image[y : y + size, x : x + size]
    return image, (mask[y : y + size, x : x + size] if mask is not None else None)


def flip(image: np.ndarray, mask: np.ndarray | None) -> tuple[np.ndarray, np.ndarray | None]:
    return image[:, ::-1], (mask[:, ::-1] if mask is not None else None)


def rotate(image: np.ndarray, mask: np.ndarray | None, degrees: float) -> tuple[np.ndarray, np.ndarray | None]:
    h, w = image.shape[:2]
    matrix = cv2.getRotationMatrix2D((w / 2, h / 2), degrees, 1.0)
    image = cv2.warpAffine(image, matrix, (w, h), flags=cv2.INTER_LINEAR, borderValue=(0, 0, 0))
    if mask is not None:
        mask = cv2.warpAffine(mask, matrix, (w, h), flags=cv2.INTER_NEAREST, borderValue=IGNORE_INDEX)
    return image, mask


def photometric(rng: np.random.Generator, image: np.ndarray) -> np.ndarray:
    """Brightness, contrast, saturation and hue jitter, each with probability 0.5 (mmseg's ranges)."""
    out = image.astype(np.float32)
    if rng.random() < 0.5:
        out += rng.uniform(-32, 32)
    contrast_first = rng.random() < 0.5
    if contrast_first and rng.random() < 0.5:
        out *= rng.uniform(0.5, 1.5)
    out = np.clip(out, 0, 255)
    saturation = rng.uniform(0.5, 1.5) if rng.random() < 0.5 else None
    hue = rng.uniform(-9, 9) if rng.random() < 0.5 else None  # OpenCV hue is 0-179: +-18 degrees
    if saturation is not None or hue is not None:
        hsv = cv2.cvtColor(out.astype(np.uint8), cv2.COLOR_RGB2HSV).astype(np.float32)
        if saturation is not None:
            hsv[..., 1] = np.clip(hsv[..., 1] * saturation, 0, 255)
        if hue is not None:
            hsv[..., 0] = (hsv[..., 0] + hue) % 180
        out = cv2.cvtColor(hsv.astype(np.uint8), cv2.COLOR_HSV2RGB).astype(np.float32)
    if not contrast_first and rng.random() < 0.5:
        out = np.clip(out * rng.uniform(0.5, 1.5), 0, 255)
    return out.astype(np.uint8)


def mix_images(rng: np.random.Generator, image: np.ndarray) -> np.ndarray:
    """Two independently distorted copies of one image, combined pixel-wise through a binary mask
    made of Gaussian-smoothed noise thresholded at its median (sigma = exp(log10(U(4, 16))))."""
    a, b = photometric(rng, image), photometric(rng, image)
    sigma = float(np.exp(np.log10(rng.uniform(4, 16))))
    noise = cv2.GaussianBlur(rng.standard_normal(image.shape[:2]).astype(np.float32), (0, 0), sigma)
    keep = (noise > np.median(noise))[..., None]
    return np.where(keep, a, b)


def geometric_augment(
    rng: np.random.Generator, image: np.ndarray, mask: np.ndarray | None, size: int, cfg: AugmentConfig
) -> tuple[np.ndarray, np.ndarray | None]:
    """Resize + crop, flip, rotate. Alone, this is Mean Teacher's "weak" augmentation."""
    image, mask = random_resize_crop(rng, image, mask, size, cfg.scale_range)
    if rng.random() < cfg.flip_p:
        image, mask = flip(image, mask)
    if rng.random() < cfg.rotate_p:
        image, mask = rotate(image, mask, rng.uniform(-cfg.max_rotate, cfg.max_rotate))
    return np.ascontiguousarray(image), (np.ascontiguousarray(mask) if mask is not None else None)


def train_augment(
    rng: np.random.Generator, image: np.ndarray, mask: np.ndarray | None, size: int, cfg: AugmentConfig
) -> tuple[np.ndarray, np.ndarray | None]:
    """Geometry, then appearance (mixing images or photometric distortion)."""
    image, mask = geometric_augment(rng, image, mask, size, cfg)
    if rng.random() < cfg.mix_p:
        image = mix_images(rng, image)
    elif rng.random() < cfg.photometric_p:
        image = photometric(rng, image)
    return np.ascontiguousarray(image), mask


def resize_for_eval(image: np.ndarray, size: int) -> np.ndarray:
    """Shorter side to ``size``, aspect kept; masks stay at their own resolution for scoring."""
    h, w = image.shape[:2]
    scale = size / min(h, w)
    return cv2.resize(image, (max(1, round(w * scale)), max(1, round(h * scale))), interpolation=cv2.INTER_LINEAR)
