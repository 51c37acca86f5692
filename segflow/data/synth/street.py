"""Procedural street scenes: the built-in data for the demo, the tests and the benchmarks (the
``street`` family; ``indoor.py`` beside it is the second family, drawn with the same canvas and
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

from dataclasses import dataclass
from typing import Literal

import numpy as np

from segflow.data.synth.canvas import Canvas, Scene, between, count
from segflow.palette import STREET_COLORS

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
