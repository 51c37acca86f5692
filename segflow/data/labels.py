"""Labels are ids: a dataset's own label ids and names, the contiguous training ids they become,
and masks decoded by their real values.

A dataset names its classes by id (``dataset_meta.json``: ``{"label_map": {"0": "sky", ...}}``,
Cityscapes-style ids with gaps, or a plain ``labels`` list whose positions are the ids). Masks
hold those ids as pixel values (8- or 16-bit, or palette indices), or the classes' colours
(``segmentation_colors[id]``). The artifact stores contiguous training ids ``0..K-1`` in
single-channel PNGs, 255 for "ignore", and the manifest keeps the map back to the dataset's own
ids and names (:meth:`LabelTable.as_manifest`).

Ignored: the value 255 always (a class named at 255, such as ``"255": "ignore"``, is the ignore
value, not a class), and every class named in ``--ignore-labels`` (e.g. ``void``). A mask value
or colour the table does not declare is an error that names the file and the values.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from segflow.data import IGNORE_INDEX
from segflow.errors import SegflowError
from segflow.storage import read_json

MAX_ID = 65535  # 16-bit masks


class MaskProblem(Exception):
    """One mask cannot be read as labels; collected per item and reported together."""


@dataclass(frozen=True)
class LabelTable:
    """``names[t]`` is training id ``t``'s class, which the dataset calls ``dataset_ids[t]``."""

    names: tuple[str, ...]
    dataset_ids: tuple[int, ...]
    ignored: tuple[int, ...] = ()  # dataset ids read as ignore (besides 255)
    colors: dict[tuple[int, int, int], int] = field(default_factory=dict)  # colour -> dataset id

    def lut(self, size: int) -> np.ndarray:
        """dataset id -> training id over ``0..size-1``; ignored ids -> 255; undeclared -> -1."""
        table = np.full(max(size, 256), -1, dtype=np.int32)
        table[IGNORE_INDEX] = IGNORE_INDEX
        for ignored in self.ignored:
            table[ignored] = IGNORE_INDEX
        for train_id, dataset_id in enumerate(self.dataset_ids):
            table[dataset_id] = train_id
        return table

    def as_manifest(self) -> dict:
        return {"dataset_ids": list(self.dataset_ids), "ignored_ids": sorted({IGNORE_INDEX, *self.ignored})}


def build_table(
    by_id: dict[int, str], colors: dict[int, tuple[int, int, int]], ignore_names: tuple[str, ...], where: str
) -> LabelTable:
    """The table of a dataset whose classes are ``by_id`` (dataset id -> name)."""
    names = list(by_id.values())
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise SegflowError(f"{where}: label names {twice} are given to more than one id: give each class one id.")
    # --ignore-labels takes names or ids: "void" or "11".
    unknown = sorted(set(ignore_names) - set(names) - {str(i) for i in by_id})
    if unknown:
        raise SegflowError(f"--ignore-labels {unknown}: no such label in {where} (labels: {', '.join(names)}).")
    ignored = tuple(
        sorted(i for i, n in by_id.items() if n in ignore_names or str(i) in ignore_names or i == IGNORE_INDEX)
    )
    kept = sorted(i for i in by_id if i not in ignored)
    if not kept:
        raise SegflowError(f"{where}: every label is ignored; nothing would be learned.")
    if len(kept) >= IGNORE_INDEX:
        raise SegflowError(f"{where}: {len(kept)} labels; at most {IGNORE_INDEX - 1} fit in 8-bit masks.")
    by_color: dict[tuple[int, int, int], int] = {}
    for dataset_id, color in colors.items():
        if color in by_color:
            raise SegflowError(
                f"{where}: labels {by_id.get(by_color[color])!r} and {by_id.get(dataset_id)!r} share the colour "
                f"{color}: give each class its own colour."
            )
        by_color[color] = dataset_id
    return LabelTable(tuple(by_id[i] for i in kept), tuple(kept), ignored, by_color)


def _pairs_without_duplicates(pairs: list[tuple[str, object]]) -> dict:
    keys = [k for k, _ in pairs]
    twice = sorted({k for k in keys if keys.count(k) > 1})
    if twice:
        raise ValueError(f"the id(s) {twice} are given more than once")
    return dict(pairs)


def read_meta(path: Path, ignore_names: tuple[str, ...] = ()) -> LabelTable:
    """The label table of a ``dataset_meta.json`` (Datumaro's Common Semantic Segmentation meta
    file): ``label_map`` read by id in any key order, ``labels`` by position, colours by id."""
    content = read_json(path, "fix the file", object_pairs_hook=_pairs_without_duplicates)
    if not isinstance(content, dict) or not (content.get("labels") or content.get("label_map")):
        raise SegflowError(f'{path} names no labels: it needs "labels": [...] or "label_map": {{"0": "name", ...}}.')
    label_map = content.get("label_map")
    if label_map:
        if not isinstance(label_map, dict) or not all(
            str(k).isdigit() and int(k) <= MAX_ID and isinstance(v, str) for k, v in label_map.items()
        ):
            raise SegflowError(f'{path}: "label_map" must map label ids (0-{MAX_ID}) to names, e.g. {{"0": "sky"}}.')
        by_id = {int(k): v for k, v in sorted(label_map.items(), key=lambda kv: int(kv[0]))}
    else:
        labels = content["labels"]
        if not isinstance(labels, list) or not all(isinstance(n, str) for n in labels):
            raise SegflowError(f'{path}: "labels" must be a list of class names.')
        by_id = dict(enumerate(labels))
    raw_colors = content.get("segmentation_colors") or []
    colors: dict[int, tuple[int, int, int]] = {}
    if raw_colors:
        if max(by_id) >= len(raw_colors):
            raise SegflowError(
                f'{path}: "segmentation_colors" has {len(raw_colors)} colours but "label_map" uses ids up to '
                f"{max(by_id)}: give every label a colour (segmentation_colors[id]), or remove "
                "segmentation_colors when the masks hold label ids."
            )
        for dataset_id in by_id:
            if raw_colors[dataset_id] is not None:
                colors[dataset_id] = rgb(raw_colors[dataset_id], f"{path}: segmentation_colors[{dataset_id}]")
    return build_table(by_id, colors, ignore_names, str(path))


def rgb(value, where: str) -> tuple[int, int, int]:
    """One declared colour: [R, G, B], whole numbers 0-255."""
    if not (isinstance(value, list) and len(value) == 3 and all(isinstance(c, int) and 0 <= c <= 255 for c in value)):
        raise SegflowError(f"{where} must be [R, G, B], whole numbers 0-255 (got {json.dumps(value)}).")
    return value[0], value[1], value[2]


LOSSY_SUFFIXES = {".jpg", ".jpeg", ".webp"}


def mask_values(path: Path, table: LabelTable, lossy: int | None = None) -> tuple[np.ndarray, bool]:
    """The mask file's pixels as dataset ids (H x W int): grey or 16-bit values, palette indices,
    or colours looked up in the table; and whether the file stores them as 8-bit grey values.
    Refuses what cannot be labels, by name. ``lossy``: a JPEG mask is read with every value
    (or colour channel) snapped to the nearest declared one within this distance."""
    if path.suffix.lower() in LOSSY_SUFFIXES and lossy is None:
        raise MaskProblem(
            f"mask is a {path.suffix.lower()[1:].upper()} file: lossy compression changes label values at every "
            "edge. Save the masks as PNG, or pass --lossy-masks TOLERANCE to snap values to the nearest label."
        )
    lossy = lossy if path.suffix.lower() in LOSSY_SUFFIXES else None
    try:
        with Image.open(path) as img:
            img.load()
            mode = img.mode
            if mode == "P" and table.colors:
                return _colours_to_ids(np.asarray(img.convert("RGB")), table, lossy), False
            if mode in ("RGB", "RGBA"):
                rgb = np.asarray(img.convert("RGB"))
                if table.colors:
                    return _colours_to_ids(rgb, table, lossy), False
                if lossy is not None:  # a grey JPEG saved as RGB
                    return _snap(rgb.mean(axis=2).round().astype(np.int32), table, lossy), False
                if (rgb[..., 0] == rgb[..., 1]).all() and (rgb[..., 1] == rgb[..., 2]).all():
                    return rgb[..., 0].astype(np.int32), False  # grey ids saved as RGB
                raise MaskProblem(
                    "mask holds colours but dataset_meta.json has no segmentation_colors to read them: add "
                    "segmentation_colors (one [R, G, B] per label id), or save the masks as label ids"
                )
            if mode in ("L", "P", "1") or mode.startswith("I"):
                values = np.asarray(img).astype(np.int32)  # ids, palette indices, 16/32-bit values
                if lossy is not None:
                    return _snap(values, table, lossy), False
                return values, mode == "L"
    except MaskProblem:
        raise
    except Exception as exc:
        raise MaskProblem(f"cannot read mask ({type(exc).__name__}: {str(exc)[:200]})") from None
    raise MaskProblem(f"mask mode {mode!r} cannot hold label ids: save it as an 8- or 16-bit grey PNG")


def _snap(values: np.ndarray, table: LabelTable, tolerance: int) -> np.ndarray:
    """Each value to the nearest declared id (or 255) within ``tolerance``; others stay as they
    are, and are refused as undeclared."""
    declared = np.asarray(sorted({*table.dataset_ids, *table.ignored, IGNORE_INDEX}))
    found, inverse = np.unique(values, return_inverse=True)
    nearest = declared[np.abs(found[:, None] - declared[None, :]).argmin(axis=1)]
    snapped = np.where(np.abs(nearest - found) <= tolerance, nearest, found)
    return snapped[inverse.reshape(values.shape)]


def _colours_to_ids(rgb: np.ndarray, table: LabelTable, tolerance: int | None = None) -> np.ndarray:
    keys = (rgb[..., 0].astype(np.int32) << 16) | (rgb[..., 1].astype(np.int32) << 8) | rgb[..., 2]
    found, inverse = np.unique(keys, return_inverse=True)
    ids = np.empty(len(found), dtype=np.int32)
    unknown = []
    palette = np.asarray(list(table.colors), dtype=np.int32)
    palette_ids = list(table.colors.values())
    for k, key in enumerate(found.tolist()):
        color = (key >> 16, (key >> 8) & 255, key & 255)
        ids[k] = table.colors.get(color, -1)
        if ids[k] < 0 and tolerance is not None:  # the nearest colour (largest channel difference)
            distance = np.abs(palette - np.asarray(color)).max(axis=1)
            if distance.min() <= tolerance:
                ids[k] = palette_ids[int(distance.argmin())]
        if ids[k] < 0:
            unknown.append(color)
    if unknown:
        shown = ", ".join(str(c) for c in unknown[:5])
        raise MaskProblem(f"colours {shown} are not in segmentation_colors of dataset_meta.json")
    return ids[inverse.reshape(keys.shape)]


def to_training_ids(values: np.ndarray, table: LabelTable) -> np.ndarray:
    """Dataset ids -> training ids (uint8, 255 = ignore); undeclared values are an error."""
    top = int(values.max()) if values.size else 0
    if values.size and int(values.min()) < 0:
        raise MaskProblem("mask holds negative values")
    lut = table.lut(top + 1)
    mapped = lut[values]
    if (mapped < 0).any():
        undeclared = sorted(int(v) for v in np.unique(values[mapped < 0]))
        declared = ", ".join(str(i) for i in table.dataset_ids)
        raise MaskProblem(f"mask values {undeclared[:10]} are not in the label map (ids {declared}; 255 = ignore)")
    return mapped.astype(np.uint8)
