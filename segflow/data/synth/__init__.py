"""The built-in synthetic data: families of procedural scenes (``street``, ``indoor``) in two
domains, for the demo, the tests and the benchmarks. ``street.py`` and ``indoor.py`` draw them,
``canvas.py`` holds the drawing and camera model they share; this module renders datasets."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from segflow.data.synth import indoor
from segflow.data.synth.canvas import Scene, render
from segflow.data.synth.street import (
    CLASS_COLORS,
    CLASSES,
    SKY,
    STYLES,
    Domain,
    draw_scene,
)
from segflow.errors import SegflowError
from segflow.progress import progress
from segflow.storage import write_file

_DOMAIN_IDS = {"source": 0, "target": 1}


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
    """The built-in families: ``street`` (the default) and ``indoor``."""
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
