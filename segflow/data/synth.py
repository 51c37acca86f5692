"""Procedural street scenes: the built-in data for the demo, the tests and the benchmarks (the
``street`` family; ``segflow.data.indoor`` is the second family, drawn with the same canvas and
camera model).

Two domains share one label set and one scene grammar but differ the way a game engine differs
from a real camera:

- ``source`` renders like a game engine: flat per-object colours, hard edges, a clean sky.
- ``target`` looks like another camera: the same hues, hazier and less saturated, another white
  balance, surface texture, sensor noise, uneven lighting, lens blur, and different layout
  statistics (lower horizon, more cars and people, fewer buildings).

A model trained on one domain loses accuracy on the other, which is what the adaptation methods
need to show their worth. Everything is drawn from a numpy Generator seeded by (seed, domain,
index), so the same seed gives the same bytes.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Protocol

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from segflow.errors import SegflowError
from segflow.palette import STREET_COLORS
from segflow.progress import progress
from segflow.storage import write_file

Domain = Literal["source", "target"]

CLASSES: tuple[str, ...] = ("sky", "building", "road", "sidewalk", "vegetation", "car", "person")
SKY, BUILDING, ROAD, SIDEWALK, VEGETATION, CAR, PERSON = range(len(CLASSES))
CLASS_COLORS = STREET_COLORS  # display colours of the classes above, in label order


@dataclass(frozen=True)
class DomainStyle:
    """Layout statistics and appearance of one domain."""

    horizon: tuple[float, float]  # horizon height as a fraction of the image height
    buildings: tuple[int, int]  # how many (inclusive range)
    building_height: tuple[float, float]  # fraction of the image height
    trees: tuple[int, int]
    cars: tuple[int, int]
    people: tuple[int, int]
    road_width: tuple[float, float]  # road width at the bottom edge, fraction of image width
    palette: dict[int, tuple[int, int, int]]  # rendered base colour per class
    jitter: float  # per-object colour variation (0-255 scale)
    textured: bool  # camera effects: texture, noise, lighting, blur


SOURCE_STYLE = DomainStyle(
    horizon=(0.36, 0.48),
    buildings=(3, 6),
    building_height=(0.15, 0.40),
    trees=(1, 3),
    cars=(1, 3),
    people=(0, 2),
    road_width=(0.55, 0.80),
    palette={
        SKY: (120, 180, 240),
        BUILDING: (170, 120, 90),
        ROAD: (90, 90, 100),
        SIDEWALK: (200, 190, 170),
        VEGETATION: (60, 170, 60),
        CAR: (200, 40, 40),
        PERSON: (240, 200, 60),
    },
    jitter=18.0,
    textured=False,
)

TARGET_STYLE = DomainStyle(
    horizon=(0.46, 0.62),
    buildings=(1, 4),
    building_height=(0.20, 0.48),
    trees=(2, 5),
    cars=(2, 5),
    people=(1, 4),
    road_width=(0.65, 0.95),
    # The source's hues, as a camera sees them: hazier, less saturated, darker. Classes keep their
    # colour family (a red car stays reddish), so what separates the domains is rendering and layout,
    # a gap unlabelled target images can close. (An earlier palette swapped hues, e.g. red cars to
    # blue: no method without target labels can learn that, and none did; benchmarks/RESULTS.md.)
    palette={
        SKY: (170, 190, 215),
        BUILDING: (140, 115, 100),
        ROAD: (105, 100, 100),
        SIDEWALK: (165, 160, 150),
        VEGETATION: (75, 120, 55),
        CAR: (150, 50, 55),
        PERSON: (190, 160, 80),
    },
    jitter=30.0,
    textured=True,
)

STYLES: dict[str, DomainStyle] = {"source": SOURCE_STYLE, "target": TARGET_STYLE}
_DOMAIN_IDS = {"source": 0, "target": 1}


@dataclass
class Scene:
    """A drawn scene: class ids and object (instance) ids per pixel, and each object's class."""

    labels: np.ndarray  # HxW uint8 class ids
    objects: np.ndarray  # HxW int32 object ids
    object_class: list[int]  # object id -> class id
    object_shade: list[float]  # object id -> brightness factor (windows, wheels are darker)


class Canvas:
    """Draws each shape into the class map and the object map at once (hard edges, no blending)."""

    def __init__(self, size: int, background: int = SKY) -> None:
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


def draw_scene(rng: np.random.Generator, size: int, style: DomainStyle) -> Scene:
    """Lay out one street scene, back to front: ground, road, buildings, trees, people, cars."""
    c = Canvas(size)
    s = float(size)
    horizon = between(rng, style.horizon) * s

    # Ground: grass verge, then a sidewalk trapezoid, then the road, all meeting at a vanishing point.
    vx = between(rng, (0.35, 0.65)) * s
    c.rectangle((0, horizon, s, s), VEGETATION, c.new_object(VEGETATION))
    half_road = between(rng, style.road_width) * s / 2
    shift = between(rng, (-0.15, 0.15)) * s
    walk = between(rng, (0.15, 0.35)) * s
    c.polygon(
        [
            (vx - 3, horizon),
            (vx + 3, horizon),
            (s / 2 + shift + half_road + walk, s),
            (s / 2 + shift - half_road - walk, s),
        ],
        SIDEWALK,
        c.new_object(SIDEWALK),
    )
    road_left = (vx - 1.5, s / 2 + shift - half_road)  # x at the horizon, x at the bottom
    road_right = (vx + 1.5, s / 2 + shift + half_road)
    c.polygon(
        [(road_left[0], horizon), (road_right[0], horizon), (road_right[1], s), (road_left[1], s)],
        ROAD,
        c.new_object(ROAD),
    )

    def road_span(y: float) -> tuple[float, float]:
        t = (y - horizon) / max(s - horizon, 1.0)
        return road_left[0] + t * (road_left[1] - road_left[0]), road_right[0] + t * (road_right[1] - road_right[0])

    # Buildings stand on the horizon; windows are darker rectangles of the same class.
    for _ in range(count(rng, style.buildings)):
        w = between(rng, (0.10, 0.30)) * s
        x = between(rng, (-0.1, 1.0)) * s
        h = between(rng, style.building_height) * s
        obj = c.new_object(BUILDING)
        c.rectangle((x, horizon - h, x + w, horizon + 1), BUILDING, obj)
        win = c.new_object(BUILDING, shade=0.55)
        step = max(4.0, s / 24)
        for wy in np.arange(horizon - h + step / 2, horizon - step, step):
            for wx in np.arange(x + step / 3, x + w - step / 2, step):
                c.rectangle((wx, wy, wx + step / 3, wy + step / 3), BUILDING, win)

    # Trees on the verges: a trunk and a crown, both vegetation.
    for _ in range(count(rng, style.trees)):
        y = horizon + between(rng, (0.0, 0.25)) * (s - horizon)
        scale = 0.4 + (y - horizon) / max(s - horizon, 1.0)
        left, right = road_span(y)
        x = between(rng, (0.0, max(left - 4, 1.0))) if rng.random() < 0.5 else between(rng, (right + 4, s))
        crown = 0.12 * s * scale
        obj = c.new_object(VEGETATION)
        c.rectangle((x - crown / 6, y - crown * 1.6, x + crown / 6, y), VEGETATION, obj)
        c.ellipse((x - crown, y - crown * 2.8, x + crown, y - crown * 1.2), VEGETATION, obj)

    # People on the sidewalks, sized by distance.
    for _ in range(count(rng, style.people)):
        y = horizon + between(rng, (0.15, 0.95)) * (s - horizon)
        scale = (y - horizon) / max(s - horizon, 1.0)
        left, right = road_span(y)
        x = (
            left - between(rng, (2, 10)) * (0.5 + scale)
            if rng.random() < 0.5
            else right + between(rng, (2, 10)) * (0.5 + scale)
        )
        h = (0.08 + 0.30 * scale) * s
        obj = c.new_object(PERSON)
        c.ellipse((x - h * 0.14, y - h * 0.82, x + h * 0.14, y), PERSON, obj)
        c.ellipse((x - h * 0.09, y - h, x + h * 0.09, y - h * 0.80), PERSON, obj)

    # Cars on the road, far ones first so near ones cover them.
    car_rows = sorted(horizon + between(rng, (0.12, 0.95)) * (s - horizon) for _ in range(count(rng, style.cars)))
    for y in car_rows:
        scale = (y - horizon) / max(s - horizon, 1.0)
        left, right = road_span(y)
        w = (0.08 + 0.30 * scale) * s
        h = w * 0.45
        x = between(rng, (left, max(left + 1, right - w)))
        obj = c.new_object(CAR)
        c.rectangle((x, y - h * 0.65, x + w, y - h * 0.1), CAR, obj)
        c.polygon(
            [(x + w * 0.2, y - h * 0.65), (x + w * 0.3, y - h), (x + w * 0.72, y - h), (x + w * 0.85, y - h * 0.65)],
            CAR,
            obj,
        )
        wheel = c.new_object(CAR, shade=0.25)
        r = h * 0.2
        for cx in (x + w * 0.22, x + w * 0.78):
            c.ellipse((cx - r, y - h * 0.1 - r, cx + r, y - h * 0.1 + r), CAR, wheel)
    return c.scene()


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


def render(rng: np.random.Generator, scene: Scene, style: Look, gradient_class: int = SKY) -> np.ndarray:
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


@dataclass(frozen=True)
class Family:
    """A kind of scene: its classes, display colours, and how to draw one in a domain's style."""

    name: str
    id: int  # part of every scene's seed, so families never share random streams
    classes: tuple[str, ...]
    colors: tuple[tuple[int, int, int], ...]
    styles: dict
    draw: Callable[[np.random.Generator, int, object], Scene]
    gradient_class: int  # lit by the flat (source) render's gradient
    file_prefix: str  # image names: PREFIX + domain + _00000.png


def family(name: str) -> Family:
    """The built-in families: ``street`` (the default) and ``indoor`` (segflow.data.indoor)."""
    from segflow.data import indoor

    families = {
        "street": Family("street", 0, CLASSES, CLASS_COLORS, STYLES, draw_scene, SKY, ""),
        "indoor": Family(
            "indoor",
            1,
            indoor.CLASSES,
            indoor.CLASS_COLORS,
            indoor.STYLES,
            indoor.draw_scene,
            indoor.CEILING,
            "indoor-",
        ),
    }
    if name not in families:
        raise SegflowError(f"--family {name!r} is not known: use {' or '.join(repr(f) for f in families)}.")
    return families[name]


FAMILIES = ("street", "indoor")


def make_sample(
    domain: Domain, index: int, size: int, seed: int, family_name: str = "street"
) -> tuple[np.ndarray, np.ndarray]:
    """Return (RGB image HxWx3 uint8, class mask HxW uint8) for one scene."""
    kind = family(family_name)
    style = kind.styles[domain]
    # The street family keeps its original seeding, so its scenes stay byte-identical.
    key = [seed, _DOMAIN_IDS[domain], index] if kind.id == 0 else [seed, kind.id, _DOMAIN_IDS[domain], index]
    rng = np.random.default_rng(key)
    scene = kind.draw(rng, size, style)
    return render(rng, scene, style, kind.gradient_class), scene.labels


def dataset_meta(family_name: str = "street") -> dict:
    """The dataset_meta.json of Datumaro's Common Semantic Segmentation format for a family's classes."""
    kind = family(family_name)
    return {
        "label_map": {str(i): name for i, name in enumerate(kind.classes)},
        "segmentation_colors": [list(c) for c in kind.colors],
    }


def synthesize(
    out: Path,
    domain: Domain,
    num_images: int,
    size: int,
    seed: int,
    unlabeled: bool = False,
    family_name: str = "street",
) -> Path:
    """Write ``num_images`` scenes of a family to ``out``.

    Labelled: Common Semantic Segmentation layout (dataset_meta.json, images/, masks/).
    Unlabelled: a plain folder of PNG images, nothing else.
    """
    kind = family(family_name)
    if domain not in STYLES:
        raise SegflowError(f"--domain {domain!r} is not known: use 'source' or 'target'.")
    if num_images < 1:
        raise SegflowError(f"--num-images must be at least 1 (got {num_images}).")
    if not 32 <= size <= 2048:
        raise SegflowError(f"--size must be between 32 and 2048 pixels (got {size}).")
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise SegflowError(f"{out} already exists and is not empty: choose a new output folder or remove it.")
    image_dir = out if unlabeled else out / "images"
    image_dir.mkdir(parents=True, exist_ok=True)
    if not unlabeled:
        (out / "masks").mkdir(exist_ok=True)
        (out / "dataset_meta.json").write_text(json.dumps(dataset_meta(family_name), indent=2) + "\n")
    for i in progress(range(num_images), num_images, f"rendering {family_name} {domain} scenes"):
        image, mask = make_sample(domain, i, size, seed, family_name)
        name = f"{kind.file_prefix}{domain}_{i:05d}.png"
        Image.fromarray(image).save(image_dir / name)
        if not unlabeled:
            Image.fromarray(mask, mode="L").save(out / "masks" / name)
    return out


def colorize(mask: np.ndarray, family_name: str = "street") -> np.ndarray:
    """Class ids to display colours; 255 (ignore) is black."""
    colors = family(family_name).colors
    palette = np.zeros((256, 3), dtype=np.uint8)
    palette[: len(colors)] = np.array(colors, dtype=np.uint8)
    return palette[mask]


def preview_grid(
    out_png: Path,
    size: int = 128,
    per_domain: int = 4,
    seed: int = 0,
    family_name: str = "street",
    overwrite: bool = False,
) -> Path:
    """Save a grid: rows = source images, source masks, target images, target masks (an existing
    file only with ``overwrite``)."""
    rows = []
    for domain in ("source", "target"):
        samples = [make_sample(domain, i, size, seed, family_name) for i in range(per_domain)]
        rows.append(np.concatenate([img for img, _ in samples], axis=1))
        rows.append(np.concatenate([colorize(mask, family_name) for _, mask in samples], axis=1))
    grid = np.concatenate(rows, axis=0)
    return write_file(out_png, lambda partial: Image.fromarray(grid).save(partial, format="PNG"), overwrite, "OUT")
