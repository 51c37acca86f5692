"""Every augmentation recipe, in one place, on HxWx3 uint8 RGB arrays (with OpenCV).

Recipes (each a function of a numpy Generator, an image and optionally its mask):
- :func:`train_augment`: the OTX supervised recipe: rescale (0.5-2x) then crop, flip, rotate,
  then "mixing images" or photometric distortion;
- :func:`weak_augment`: geometry only (Mean Teacher's teacher input);
- :func:`strong_augment`: a weak view's pixels, recoloured, sometimes grey or blurred, with one CutOut box
  (Mean Teacher's student input: the same geometry, so the teacher's labels still fit);
- :func:`mixed_view`: DACS's recolouring and blur of a ClassMix image (source pixels pasted onto a
  target image), applied to the student's input only;
- :func:`contrastive_view`: DetCon-B's view (RandomResizedCrop, flip, colour jitter, greyscale,
  blur, solarize). DetCon cuts its masks from Felzenszwalb segments, SupCon from label maps.

Every random choice comes from the Generator passed in, which datasets derive from (seed,
epoch, index): the same run gives the same batches with any number of loader workers, and a
resumed run continues exactly where the killed one stopped. Masks follow the geometry (nearest
neighbour) and are padded with the ignore value.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

from segflow.data import IGNORE_INDEX

Mask = np.ndarray | None


@dataclass(frozen=True)
class AugmentConfig:
    scale_range: tuple[float, float] = (0.5, 2.0)  # random rescale around the crop size
    flip_p: float = 0.5
    rotate_p: float = 0.5
    max_rotate: float = 30.0
    photometric_p: float = 1.0
    mix_p: float = 0.5  # "mixing images": two photometric variants blended through a noise mask


# --- geometry -----------------------------------------------------------------------------------


def _crop(image: np.ndarray, mask: Mask, y: int, x: int, h: int, w: int, size: int) -> tuple[np.ndarray, Mask]:
    """Cut (y, x, h, w) and resize it to size x size (the mask by nearest neighbour)."""
    image = cv2.resize(image[y : y + h, x : x + w], (size, size), interpolation=cv2.INTER_LINEAR)
    if mask is not None:
        mask = cv2.resize(mask[y : y + h, x : x + w], (size, size), interpolation=cv2.INTER_NEAREST)
    return image, mask


def rescale_crop(
    rng: np.random.Generator, image: np.ndarray, mask: Mask, size: int, scale_range: tuple[float, float]
) -> tuple[np.ndarray, Mask]:
    """Shorter side to ``size * U(scale_range)``, then a random ``size`` crop (padded when smaller)."""
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


def resized_crop(
    rng: np.random.Generator,
    image: np.ndarray,
    mask: Mask,
    size: int,
    scale: tuple[float, float] = (0.2, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
) -> tuple[np.ndarray, Mask]:
    """RandomResizedCrop: a crop of ``scale`` of the area and ``ratio`` aspect, resized to ``size``."""
    h, w = image.shape[:2]
    for _ in range(10):
        area = h * w * rng.uniform(*scale)
        aspect = np.exp(rng.uniform(np.log(ratio[0]), np.log(ratio[1])))
        cw, ch = round(np.sqrt(area * aspect)), round(np.sqrt(area / aspect))
        if 0 < cw <= w and 0 < ch <= h:
            return _crop(image, mask, int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1)), ch, cw, size)
    return _crop(image, mask, 0, 0, h, w, size)


def flip(image: np.ndarray, mask: Mask) -> tuple[np.ndarray, Mask]:
    return image[:, ::-1], (mask[:, ::-1] if mask is not None else None)


def rotate(image: np.ndarray, mask: Mask, degrees: float) -> tuple[np.ndarray, Mask]:
    h, w = image.shape[:2]
    matrix = cv2.getRotationMatrix2D((w / 2, h / 2), degrees, 1.0)
    image = cv2.warpAffine(image, matrix, (w, h), flags=cv2.INTER_LINEAR, borderValue=(0, 0, 0))
    if mask is not None:
        mask = cv2.warpAffine(mask, matrix, (w, h), flags=cv2.INTER_NEAREST, borderValue=IGNORE_INDEX)
    return image, mask


# --- appearance ---------------------------------------------------------------------------------


def colour_jitter(
    rng: np.random.Generator,
    image: np.ndarray,
    brightness: float,
    contrast: float,
    saturation: float,
    hue: float,
    p_each: float = 1.0,
) -> np.ndarray:
    """torchvision's ColorJitter semantics: brightness factor U(1 +- b), contrast about the mean
    U(1 +- c), saturation U(1 +- s), hue shift U(+- h) of a full turn; each applied with
    probability ``p_each``, in that order."""
    out = image.astype(np.float32)
    if brightness and rng.random() < p_each:
        out *= rng.uniform(1 - brightness, 1 + brightness)
    if contrast and rng.random() < p_each:
        mean = out.mean()
        out = (out - mean) * rng.uniform(1 - contrast, 1 + contrast) + mean
    gain = rng.uniform(1 - saturation, 1 + saturation) if saturation and rng.random() < p_each else None
    shift = rng.uniform(-hue, hue) * 180 if hue and rng.random() < p_each else None  # OpenCV hue: 0-179
    out = np.clip(out, 0, 255)
    if gain is not None or shift is not None:
        hsv = cv2.cvtColor(out.astype(np.uint8), cv2.COLOR_RGB2HSV).astype(np.float32)
        if gain is not None:
            hsv[..., 1] = np.clip(hsv[..., 1] * gain, 0, 255)
        if shift is not None:
            hsv[..., 0] = (hsv[..., 0] + shift) % 180
        return cv2.cvtColor(hsv.astype(np.uint8), cv2.COLOR_HSV2RGB)
    return out.astype(np.uint8)


def photometric(rng: np.random.Generator, image: np.ndarray) -> np.ndarray:
    """The supervised recipe's photometric distortion (mmseg's ranges: each change with p 0.5)."""
    return colour_jitter(rng, image, brightness=0.25, contrast=0.5, saturation=0.5, hue=0.05, p_each=0.5)


def greyscale(image: np.ndarray) -> np.ndarray:
    return np.repeat(cv2.cvtColor(image, cv2.COLOR_RGB2GRAY)[..., None], 3, axis=2)


def mix_images(rng: np.random.Generator, image: np.ndarray) -> np.ndarray:
    """Two independently distorted copies of one image, combined pixel-wise through a binary mask
    made of Gaussian-smoothed noise thresholded at its median (sigma = exp(log10(U(4, 16))))."""
    a, b = photometric(rng, image), photometric(rng, image)
    sigma = float(np.exp(np.log10(rng.uniform(4, 16))))
    noise = cv2.GaussianBlur(rng.standard_normal(image.shape[:2]).astype(np.float32), (0, 0), sigma)
    keep = (noise > np.median(noise))[..., None]
    return np.where(keep, a, b)


def cutout(rng: np.random.Generator, image: np.ndarray, low: float = 0.1, high: float = 0.4) -> np.ndarray:
    """One box of 10-40% of each side filled with black."""
    h, w = image.shape[:2]
    bh, bw = int(rng.uniform(low, high) * h), int(rng.uniform(low, high) * w)
    y, x = int(rng.integers(0, h - bh + 1)), int(rng.integers(0, w - bw + 1))
    out = image.copy()
    out[y : y + bh, x : x + bw] = 0
    return out


# --- recipes ------------------------------------------------------------------------------------


def weak_augment(
    rng: np.random.Generator, image: np.ndarray, mask: Mask, size: int, cfg: AugmentConfig
) -> tuple[np.ndarray, Mask]:
    """Rescale + crop, flip, rotate: geometry only."""
    image, mask = rescale_crop(rng, image, mask, size, cfg.scale_range)
    if rng.random() < cfg.flip_p:
        image, mask = flip(image, mask)
    if rng.random() < cfg.rotate_p:
        image, mask = rotate(image, mask, rng.uniform(-cfg.max_rotate, cfg.max_rotate))
    return np.ascontiguousarray(image), (np.ascontiguousarray(mask) if mask is not None else None)


def train_augment(
    rng: np.random.Generator, image: np.ndarray, mask: Mask, size: int, cfg: AugmentConfig
) -> tuple[np.ndarray, Mask]:
    """Geometry, then appearance (mixing images or photometric distortion)."""
    image, mask = weak_augment(rng, image, mask, size, cfg)
    if rng.random() < cfg.mix_p:
        image = mix_images(rng, image)
    elif rng.random() < cfg.photometric_p:
        image = photometric(rng, image)
    return np.ascontiguousarray(image), mask


def strong_augment(rng: np.random.Generator, image: np.ndarray) -> np.ndarray:
    """The student's view of a weakly augmented image (UniMatch's strong view without CutMix):
    recoloured, grey with p 0.2, blurred with p 0.5 (sigma 0.1-2 at 224 px, scaled to the image),
    one CutOut box. The teacher only ever sees the weak view."""
    out = colour_jitter(rng, image, brightness=0.5, contrast=0.5, saturation=0.5, hue=0.1, p_each=0.8)
    if rng.random() < 0.2:
        out = greyscale(out)
    if rng.random() < 0.5:
        out = cv2.GaussianBlur(out, (0, 0), rng.uniform(0.1, 2.0) * out.shape[0] / 224)
    return np.ascontiguousarray(cutout(rng, out))


def mixed_view(rng: np.random.Generator, image: np.ndarray) -> np.ndarray:
    """DACS (Tranheden et al., 2021) augments each mixed image before the student sees it: colour
    jitter of strength 0.2 with p 0.8, then Gaussian blur with p 0.5 (sigma 0.15-1.15 px). The
    teacher's pseudo-labels come from the clean target image."""
    out = image
    if rng.random() < 0.8:
        out = colour_jitter(rng, out, brightness=0.2, contrast=0.2, saturation=0.2, hue=0.2)
    if rng.random() < 0.5:
        out = cv2.GaussianBlur(out, (0, 0), rng.uniform(0.15, 1.15))
    return np.ascontiguousarray(out)


def contrastive_view(
    rng: np.random.Generator, image: np.ndarray, mask: np.ndarray, size: int, blur_p: float, solarize_p: float
) -> tuple[np.ndarray, np.ndarray]:
    """One DetCon-B view: RandomResizedCrop, flip, colour jitter (0.4, 0.4, 0.2, 0.1) with p 0.8,
    greyscale p 0.2, Gaussian blur with ``blur_p``, solarize with ``solarize_p``."""
    image, mask = resized_crop(rng, image, mask, size)
    if rng.random() < 0.5:
        image, mask = flip(image, mask)
    if rng.random() < 0.8:
        image = colour_jitter(rng, image, brightness=0.4, contrast=0.4, saturation=0.2, hue=0.1)
    if rng.random() < 0.2:
        image = greyscale(image)
    if rng.random() < blur_p:
        image = cv2.GaussianBlur(image, (0, 0), rng.uniform(0.1, 2.0))
    if rng.random() < solarize_p:
        image = np.where(image >= 128, 255 - image, image).astype(np.uint8)
    return np.ascontiguousarray(image), np.ascontiguousarray(mask)


def contrastive_pair(
    rng: np.random.Generator, image: np.ndarray, mask: np.ndarray, size: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """DetCon-B's two views: the first always blurred, the second sometimes blurred and solarized."""
    v1, m1 = contrastive_view(rng, image, mask, size, blur_p=1.0, solarize_p=0.0)
    v2, m2 = contrastive_view(rng, image, mask, size, blur_p=0.1, solarize_p=0.2)
    return v1, m1, v2, m2


def tile_crop(
    rng: np.random.Generator,
    image: np.ndarray,
    mask: np.ndarray,
    size: int,
    scale: float,
    focus: tuple[int, int] | None = None,
    jitter: tuple[float, float] = (0.8, 1.25),
) -> tuple[np.ndarray, np.ndarray]:
    """A training tile cut from a full-resolution image: a square of ``size / scale`` image pixels
    (times a small random zoom, ``jitter``), around ``focus`` (row, column) when given, else
    anywhere; resized to ``size``. Beyond the image's edge: image 0, mask ignore."""
    h, w = image.shape[:2]
    side = max(1, round(size / (scale * rng.uniform(*jitter))))
    if focus is None:
        y = int(rng.integers(min(0, h - side), max(0, h - side) + 1))
        x = int(rng.integers(min(0, w - side), max(0, w - side) + 1))
    else:  # the focus pixel lands anywhere in the tile's middle half
        y = focus[0] - side // 2 + int(rng.integers(-side // 4, side // 4 + 1))
        x = focus[1] - side // 2 + int(rng.integers(-side // 4, side // 4 + 1))
        y, x = min(max(y, min(0, h - side)), max(0, h - side)), min(max(x, min(0, w - side)), max(0, w - side))
    top, left, bottom, right = max(0, -y), max(0, -x), max(0, y + side - h), max(0, x + side - w)
    image = image[max(0, y) : y + side, max(0, x) : x + side]
    mask = mask[max(0, y) : y + side, max(0, x) : x + side]
    if top or left or bottom or right:
        image = cv2.copyMakeBorder(image, top, bottom, left, right, cv2.BORDER_CONSTANT, value=(0, 0, 0))
        mask = cv2.copyMakeBorder(mask, top, bottom, left, right, cv2.BORDER_CONSTANT, value=IGNORE_INDEX)
    image = cv2.resize(image, (size, size), interpolation=cv2.INTER_AREA if side > size else cv2.INTER_LINEAR)
    return image, cv2.resize(mask, (size, size), interpolation=cv2.INTER_NEAREST)


def resize_for_eval(image: np.ndarray, size: int) -> np.ndarray:
    """Shorter side to ``size``, aspect kept; masks stay at their own resolution for scoring."""
    h, w = image.shape[:2]
    scale = size / min(h, w)
    return cv2.resize(image, (max(1, round(w * scale)), max(1, round(h * scale))), interpolation=cv2.INTER_LINEAR)
