"""Procedural indoor scenes: the second built-in data family (``segflow data synth --family indoor``).

It differs from the street scenes in everything the methods could have been tuned on:

- **classes:** eight instead of seven, none shared (wall, floor, ceiling, window, door, table, chair,
  plant);
- **geometry:** a room seen in one-point perspective (a back wall framed by two side walls, the floor
  and the ceiling) instead of an open road to a horizon; furniture stands on the floor plane;
- **texture:** patterned surfaces drawn into the object map (floor planks converging to the vanishing
  point, striped wallpaper, window panes), so one class is many regions of different brightness;
- **class balance:** walls and floor fill most of the image; chairs and plants are small and rare.

The two domains mirror the street family's: ``source`` is a flat render, ``target`` a camera (warm
light, texture, noise, blur, vignetting). Drawing and rendering share the street family's canvas and
camera model (``canvas.py``); everything is drawn from a numpy Generator seeded by (seed,
family, domain, index), so the same seed gives the same bytes.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from segflow.data.synth.canvas import Canvas, Scene, between, count

CLASSES: tuple[str, ...] = ("wall", "floor", "ceiling", "window", "door", "table", "chair", "plant")
WALL, FLOOR, CEILING, WINDOW, DOOR, TABLE, CHAIR, PLANT = range(len(CLASSES))

# Display colours (ADE20K-like), in label order; not the colours the scenes are rendered in.
CLASS_COLORS: tuple[tuple[int, int, int], ...] = (
    (120, 120, 120),
    (80, 50, 50),
    (120, 120, 80),
    (230, 230, 230),
    (8, 255, 51),
    (255, 6, 82),
    (204, 70, 3),
    (4, 200, 3),
)


@dataclass(frozen=True)
class IndoorStyle:
    """Room layout statistics and appearance of one domain."""

    back_width: tuple[float, float]  # back wall width, fraction of the image width
    back_height: tuple[float, float]  # back wall height, fraction of the image height
    windows: tuple[int, int]
    tables: tuple[int, int]
    chairs: tuple[int, int]
    plants: tuple[int, int]
    planks: tuple[int, int]  # floor planks across the bottom edge
    palette: dict[int, tuple[int, int, int]]
    jitter: float
    textured: bool


SOURCE_STYLE = IndoorStyle(
    back_width=(0.40, 0.60),
    back_height=(0.35, 0.50),
    windows=(1, 2),
    tables=(1, 1),
    chairs=(1, 2),
    plants=(0, 1),
    planks=(5, 8),
    palette={
        WALL: (225, 215, 190),
        FLOOR: (160, 110, 60),
        CEILING: (245, 245, 240),
        WINDOW: (150, 200, 245),
        DOOR: (120, 80, 50),
        TABLE: (90, 60, 40),
        CHAIR: (60, 90, 150),
        PLANT: (50, 140, 50),
    },
    jitter=14.0,
    textured=False,
)

TARGET_STYLE = IndoorStyle(
    back_width=(0.30, 0.55),
    back_height=(0.30, 0.45),
    windows=(0, 2),
    tables=(1, 2),
    chairs=(1, 4),
    plants=(0, 2),
    planks=(6, 12),
    palette={
        WALL: (170, 180, 185),
        FLOOR: (120, 100, 85),
        CEILING: (200, 195, 185),
        WINDOW: (235, 240, 240),
        DOOR: (180, 170, 150),
        TABLE: (150, 120, 90),
        CHAIR: (140, 60, 50),
        PLANT: (60, 100, 40),
    },
    jitter=16.0,
    textured=True,
)

STYLES: dict[str, IndoorStyle] = {"source": SOURCE_STYLE, "target": TARGET_STYLE}


def _lerp(a: tuple[float, float], b: tuple[float, float], t: float) -> tuple[float, float]:
    return a[0] + t * (b[0] - a[0]), a[1] + t * (b[1] - a[1])


def draw_scene(rng: np.random.Generator, size: int, style: IndoorStyle) -> Scene:
    """Lay out one room, back to front: shell, wall patterns, openings, then furniture by depth."""
    s = float(size)
    c = Canvas(size, background=WALL)
    bw, bh = between(rng, style.back_width) * s, between(rng, style.back_height) * s
    x0 = between(rng, (0.15, 0.85)) * (s - bw)
    y0 = between(rng, (0.20, 0.75)) * (s - bh)
    x1, y1 = x0 + bw, y0 + bh

    # The shell: ceiling and floor trapezoids, two side walls (darker), the back wall.
    c.polygon([(0, 0), (s, 0), (x1, y0), (x0, y0)], CEILING, c.new_object(CEILING))
    c.polygon([(0, 0), (x0, y0), (x0, y1), (0, s)], WALL, c.new_object(WALL, shade=0.80))
    c.polygon([(s, 0), (x1, y0), (x1, y1), (s, s)], WALL, c.new_object(WALL, shade=0.88))
    back = c.new_object(WALL)
    c.rectangle((x0, y0, x1, y1), WALL, back)

    # Striped wallpaper on the back wall: every other stripe a little darker.
    stripe = c.new_object(WALL, shade=0.90)
    step = max(3.0, bw / count(rng, (6, 12)))
    for sx in np.arange(x0, x1, 2 * step):
        c.rectangle((sx, y0, min(sx + step, x1), y1), WALL, stripe)

    # Floor planks: strips from the back wall's bottom edge to the image's bottom edge.
    planks = count(rng, style.planks)
    dark = c.new_object(FLOOR, shade=0.85)
    light = c.new_object(FLOOR)
    for i in range(planks):
        a, b = i / planks, (i + 1) / planks
        top = (x0 + a * bw, x0 + b * bw)
        bottom = (-0.3 * s + a * 1.6 * s, -0.3 * s + b * 1.6 * s)
        poly = [(top[0], y1), (top[1], y1), (bottom[1], s), (bottom[0], s)]
        c.polygon(poly, FLOOR, dark if i % 2 else light)

    # Windows on the back wall (panes darker than the frame), a door on a side wall.
    for _ in range(count(rng, style.windows)):
        ww, wh = between(rng, (0.15, 0.30)) * bw, between(rng, (0.30, 0.55)) * bh
        wx, wy = x0 + between(rng, (0.05, 0.95)) * (bw - ww), y0 + between(rng, (0.10, 0.35)) * bh
        c.rectangle((wx, wy, wx + ww, wy + wh), WINDOW, c.new_object(WINDOW, shade=0.75))
        pane = c.new_object(WINDOW)
        gap = max(1.0, ww / 12)
        for px, py in ((0, 0), (1, 0), (0, 1), (1, 1)):
            c.rectangle(
                (
                    wx + gap + px * ww / 2,
                    wy + gap + py * wh / 2,
                    wx + (px + 1) * ww / 2 - gap,
                    wy + (py + 1) * wh / 2 - gap,
                ),
                WINDOW,
                pane,
            )
    left = rng.random() < 0.5
    outer_x, inner_x = (0.0, x0) if left else (s, x1)
    t0, t1 = sorted(between(rng, (0.25, 0.85)) for _ in range(2))
    t1 = min(1.0, t0 + max(t1 - t0, 0.18))
    near, far = _lerp((outer_x, s), (inner_x, y1), t0), _lerp((outer_x, s), (inner_x, y1), t1)
    height = 0.75  # of the wall's height at that depth
    near_top = _lerp((outer_x, 0.0), (inner_x, y0), t0)
    far_top = _lerp((outer_x, 0.0), (inner_x, y0), t1)
    door_top = (near[1] + height * (near_top[1] - near[1]), far[1] + height * (far_top[1] - far[1]))
    c.polygon(
        [(near[0], near[1]), (far[0], far[1]), (far[0], door_top[1]), (near[0], door_top[0])], DOOR, c.new_object(DOOR)
    )

    # Furniture on the floor, far to near, sized by depth (0 at the back wall, 1 at the bottom).
    items = [("table", between(rng, (0.1, 0.8))) for _ in range(count(rng, style.tables))]
    items += [("chair", between(rng, (0.1, 0.95))) for _ in range(count(rng, style.chairs))]
    items += [("plant", between(rng, (0.0, 0.9))) for _ in range(count(rng, style.plants))]
    for kind, depth in sorted(items, key=lambda item: item[1]):
        y = y1 + depth * (s - y1)
        scale = 0.35 + 0.9 * depth
        half = (bw / 2) * (1 + depth * (1.6 * s / bw - 1))  # floor half-width at that depth
        cx = (x0 + x1) / 2 + between(rng, (-0.8, 0.8)) * half
        if kind == "table":
            _table(c, cx, y, 0.30 * s * scale)
        elif kind == "chair":
            _chair(c, cx, y, 0.16 * s * scale)
        else:
            _plant(rng, c, cx, y, 0.14 * s * scale)
    return c.scene()


def _table(c: Canvas, cx: float, y: float, w: float) -> None:
    obj = c.new_object(TABLE)
    top = w * 0.22
    c.polygon(
        [
            (cx - w / 2, y - w * 0.45),
            (cx + w / 2, y - w * 0.45),
            (cx + w * 0.42, y - w * 0.45 + top),
            (cx - w * 0.42, y - w * 0.45 + top),
        ],
        TABLE,
        obj,
    )
    legs = c.new_object(TABLE, shade=0.7)
    leg = max(1.0, w * 0.05)
    for lx in (cx - w * 0.38, cx + w * 0.38 - leg):
        c.rectangle((lx, y - w * 0.45 + top, lx + leg, y), TABLE, legs)


def _chair(c: Canvas, cx: float, y: float, w: float) -> None:
    obj = c.new_object(CHAIR)
    c.rectangle((cx - w / 2, y - w * 1.6, cx + w / 2, y - w * 0.7), CHAIR, obj)  # back rest
    c.rectangle((cx - w / 2, y - w * 0.75, cx + w / 2, y - w * 0.55), CHAIR, c.new_object(CHAIR, shade=0.8))
    legs = c.new_object(CHAIR, shade=0.6)
    leg = max(1.0, w * 0.1)
    for lx in (cx - w / 2, cx + w / 2 - leg):
        c.rectangle((lx, y - w * 0.55, lx + leg, y), CHAIR, legs)


def _plant(rng: np.random.Generator, c: Canvas, cx: float, y: float, w: float) -> None:
    c.polygon(
        [(cx - w * 0.35, y - w * 0.6), (cx + w * 0.35, y - w * 0.6), (cx + w * 0.25, y), (cx - w * 0.25, y)],
        PLANT,
        c.new_object(PLANT, shade=0.6),
    )
    leaves = c.new_object(PLANT)
    for _ in range(5):
        lx, ly = cx + between(rng, (-0.5, 0.5)) * w, y - w * between(rng, (0.9, 1.6))
        r = w * between(rng, (0.2, 0.4))
        c.ellipse((lx - r, ly - r * 1.4, lx + r, ly + r * 1.4), PLANT, leaves)
