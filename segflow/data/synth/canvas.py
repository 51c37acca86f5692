"""Drawing and the camera model the synthetic families share: a canvas that paints class and
object maps at once, and the render that turns a scene into an image in a domain's look (flat like a
game engine, or textured, lit, blurred and noisy like a camera)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np
from PIL import Image, ImageDraw, ImageFilter


@dataclass
class Scene:
    """A drawn scene: class ids and object (instance) ids per pixel, and each object's class."""

    labels: np.ndarray  # HxW uint8 class ids
    objects: np.ndarray  # HxW int32 object ids
    object_class: list[int]  # object id -> class id
    object_shade: list[float]  # object id -> brightness factor (windows, wheels are darker)


class Canvas:
    """Draws each shape into the class map and the object map at once (hard edges, no blending)."""

    def __init__(self, size: int, background: int = 0) -> None:
        self.size = size
        self.labels = Image.new("L", (size, size), background)
        self.objects = Image.new("I", (size, size), 0)
        self._draw_labels = ImageDraw.Draw(self.labels)
        self._draw_objects = ImageDraw.Draw(self.objects)
        self.object_class: list[int] = [background]  # object 0 is the background (the sky)
        self.object_shade: list[float] = [1.0]

    def new_object(self, cls: int, shade: float = 1.0) -> int:
        self.object_class.append(cls)
        self.object_shade.append(shade)
        return len(self.object_class) - 1

    def polygon(self, points: list[tuple[float, float]], cls: int, obj: int) -> None:
        self._draw_labels.polygon(points, fill=cls)
        self._draw_objects.polygon(points, fill=obj)

    def rectangle(self, box: tuple[float, float, float, float], cls: int, obj: int) -> None:
        x0, y0, x1, y1 = box
        box = (min(x0, x1), min(y0, y1), max(x0, x1), max(y0, y1))
        self._draw_labels.rectangle(box, fill=cls)
        self._draw_objects.rectangle(box, fill=obj)

    def ellipse(self, box: tuple[float, float, float, float], cls: int, obj: int) -> None:
        x0, y0, x1, y1 = box
        box = (min(x0, x1), min(y0, y1), max(x0, x1), max(y0, y1))
        self._draw_labels.ellipse(box, fill=cls)
        self._draw_objects.ellipse(box, fill=obj)

    def scene(self) -> Scene:
        return Scene(
            labels=np.asarray(self.labels, dtype=np.uint8).copy(),
            objects=np.asarray(self.objects, dtype=np.int32).copy(),
            object_class=list(self.object_class),
            object_shade=list(self.object_shade),
        )


def between(rng: np.random.Generator, bounds: tuple[float, float]) -> float:
    return float(rng.uniform(bounds[0], bounds[1]))


def count(rng: np.random.Generator, bounds: tuple[int, int]) -> int:
    return int(rng.integers(bounds[0], bounds[1] + 1))


class Look(Protocol):
    """What rendering needs of a domain style (street and indoor styles both have it)."""

    palette: dict[int, tuple[int, int, int]]
    jitter: float
    textured: bool


def _object_colors(rng: np.random.Generator, scene: Scene, style: Look) -> np.ndarray:
    """One colour per object: the class's base colour plus per-object jitter."""
    base = np.array([style.palette[cls] for cls in scene.object_class], dtype=np.float32)
    jitter = rng.normal(0.0, style.jitter, size=base.shape).astype(np.float32)
    shade = np.array(scene.object_shade, dtype=np.float32)[:, None]
    return np.clip((base + jitter) * shade, 0, 255)


def _smooth_noise(rng: np.random.Generator, size: int, cells: int) -> np.ndarray:
    """Low-frequency noise in [-1, 1]: random values on a coarse grid, bilinearly upsampled."""
    coarse = rng.uniform(-1.0, 1.0, size=(cells, cells)).astype(np.float32)
    img = Image.fromarray(coarse, mode="F").resize((size, size), Image.Resampling.BILINEAR)
    return np.asarray(img, dtype=np.float32)


def render(rng: np.random.Generator, scene: Scene, style: Look, gradient_class: int = 0) -> np.ndarray:
    """Paint a scene into an HxWx3 uint8 RGB image in the domain's style."""
    size = scene.labels.shape[0]
    colors = _object_colors(rng, scene, style)
    img = colors[scene.objects]  # HxWx3 float32
    if not style.textured:
        # Game-engine light: a clean vertical gradient on one class (the sky); the rest stays flat.
        rows = np.linspace(1.0, 0.8, size, dtype=np.float32)[:, None, None]
        sky = scene.labels[..., None] == gradient_class
        img = np.where(sky, img * rows, img)
        return np.clip(img, 0, 255).astype(np.uint8)

    # Camera look: surface texture, uneven light, white balance, blur, sensor noise, gamma.
    texture = 1.0 + 0.12 * _smooth_noise(rng, size, 12)[..., None] + 0.10 * _smooth_noise(rng, size, 48)[..., None]
    img = img * texture
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    sun = between(rng, (-0.35, 0.35))
    light = 1.0 + sun * (xx - 0.5) - 0.35 * ((xx - 0.5) ** 2 + (yy - 0.5) ** 2)
    img = img * light[..., None]
    cast = np.array([between(rng, (0.9, 1.1)) for _ in range(3)], dtype=np.float32)
    img = np.clip(img * cast, 0, 255)
    radius = between(rng, (0.6, 1.3)) * size / 128
    blurred = Image.fromarray(img.astype(np.uint8)).filter(ImageFilter.GaussianBlur(radius))
    img = np.asarray(blurred, dtype=np.float32) + rng.normal(0.0, 6.0, size=img.shape).astype(np.float32)
    gamma = between(rng, (0.8, 1.2))
    img = 255.0 * (np.clip(img, 0, 255) / 255.0) ** gamma
    return np.clip(img, 0, 255).astype(np.uint8)
