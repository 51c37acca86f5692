"""The per-item work of an import, in worker processes: each image decodes completely, has a mask
of its size whose every value names a label, and is written out (original bytes when already RGB
PNG or JPEG). Workers are forked and inherit the job instead of having it pickled."""

from __future__ import annotations

import hashlib
import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from segflow.data import IGNORE_INDEX
from segflow.data.datasets import image_error
from segflow.data.labels import LabelTable, MaskProblem, mask_values, to_training_ids
from segflow.data.layouts import (
    PairedItem,
)
from segflow.data.manifest import ItemResult
from segflow.errors import SegflowError
from segflow.parallel import map_all
from segflow.storage import confined

_COPYABLE = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG"}


_EXIF_ORIENTATION = 0x0112
# Serial below this many items: forking workers costs more than it saves.


_MIN_PARALLEL_ITEMS = 48


@dataclass(frozen=True)
class ItemJob:
    """Everything a worker needs; inherited by forked workers instead of pickled."""

    items: list  # PairedItem, or Datumaro's DatasetItem for the formats Datumaro reads
    placement: list[tuple[str, str]]  # (subset, output name) per item
    table: LabelTable
    out: Path
    root: Path
    fill: int = IGNORE_INDEX  # Datumaro position of the class of pixels no mask covers (MVTec's "good")
    lossy: int | None = None  # JPEG masks: snap to the nearest label within this distance


_JOB: ItemJob | None = None


def check_items(job: ItemJob, workers: int) -> list[ItemResult]:
    global _JOB
    for subset in {s for s, _ in job.placement}:
        (job.out / subset / "images").mkdir(parents=True, exist_ok=True)
        (job.out / subset / "masks").mkdir(parents=True, exist_ok=True)
    _JOB = job  # forked workers inherit it with the Datumaro items (and their lazy loaders)
    try:
        return map_all(
            _process_item, range(len(job.items)), workers, "checking items", min_parallel=_MIN_PARALLEL_ITEMS
        )
    finally:
        _JOB = None


def _display(path: str | None, job: ItemJob, fallback: str) -> str:
    if not path:
        return fallback
    try:
        return str(Path(path).relative_to(job.root))
    except ValueError:
        return str(path)


def _process_item(index: int) -> ItemResult:
    job = _JOB
    assert job is not None
    item = job.items[index]
    subset, name = job.placement[index]
    result = ItemResult(subset=subset, name=name)
    media_path = getattr(item.media, "path", "") if item.media is not None else ""
    where = _display(media_path, job, f"item {item.id!r} (subset {item.subset!r})")
    result.source_path = where
    try:
        image, raw, ext, result.oriented = _read_image(item, media_path)
    except _ItemProblem as exc:
        result.problems.append(f"{where}: {exc}")
        return result

    try:
        if isinstance(item, PairedItem):
            mask, copy_source = _paired_mask(item.mask, image.shape[:2], job.table, job.lossy)
        else:
            positions = _compose_mask(item, image.shape[:2], job.table, job.fill)
            mask, copy_source = to_training_ids(positions, job.table), False
    except (_ItemProblem, MaskProblem) as exc:
        mask_path = item.mask if isinstance(item, PairedItem) else None
        result.problems.append(f"{_display(str(mask_path), job, where) if mask_path else where}: {exc}")
        return result

    if raw is None:  # re-encode: not a plain RGB PNG/JPEG file
        buffer = io.BytesIO()
        Image.fromarray(image).save(buffer, format="PNG")
        raw, ext = buffer.getvalue(), ".png"
    image_rel = f"{subset}/images/{name}{ext}"
    mask_rel = f"{subset}/masks/{name}.png"
    try:
        # Item ids come from the dataset: never let one escape OUT. OUT is our own fresh staging
        # folder, which holds no symbolic links, so the name check suffices (no per-file resolve).
        for rel in (image_rel, mask_rel):
            confined(job.out, rel, f"dataset item {item.id!r} ({rel})", links=False)
    except SegflowError as exc:
        result.problems.append(str(exc))
        return result
    if copy_source:
        mask_bytes = item.mask.read_bytes()  # already a single-channel PNG of these very training ids
    else:
        buffer = io.BytesIO()
        Image.fromarray(mask, mode="L").save(buffer, format="PNG", compress_level=1)
        mask_bytes = buffer.getvalue()
    (job.out / image_rel).write_bytes(raw)
    (job.out / mask_rel).write_bytes(mask_bytes)

    result.image_sha256 = hashlib.sha256(raw).hexdigest()
    result.files = {image_rel: result.image_sha256, mask_rel: hashlib.sha256(mask_bytes).hexdigest()}
    result.height, result.width = mask.shape
    result.label_pixels = np.bincount(mask.ravel(), minlength=256).astype(np.int64)
    # Normalisation statistics from every 4th row and column: 1/16 of the work, and over hundreds
    # of images the same mean and std to two digits. Histograms: exact and fast on uint8.
    sample = image[::4, ::4]
    result.channel_histogram = np.stack([np.bincount(sample[..., c].ravel(), minlength=256) for c in range(3)])
    return result


class _ItemProblem(Exception):
    """A problem with one item; collected, then reported together."""


def _read_image(item, media_path: str) -> tuple[np.ndarray, bytes | None, str, bool]:
    """Decode the item's image completely, turned to its EXIF orientation (as viewers show it,
    and as it was annotated). Return (RGB array, original bytes if copyable, ext, turned)."""
    if item.media is None:
        raise _ItemProblem("item has no image")
    if media_path:
        path = Path(media_path)
        if not path.is_file():
            raise _ItemProblem("image file does not exist")
        raw = path.read_bytes()
        if not raw:
            raise _ItemProblem("file is empty (0 bytes)")
        try:
            with Image.open(io.BytesIO(raw)) as pil:
                pil.load()  # a truncated file fails here, not later in training
                mode, fmt = pil.mode, pil.format
                turned = pil.getexif().get(_EXIF_ORIENTATION, 1) not in (1, None)
                shown = ImageOps.exif_transpose(pil) if turned else pil
                rgb = np.asarray(shown if shown.mode == "RGB" else shown.convert("RGB"))
        except Exception as exc:
            raise _ItemProblem(f"cannot decode image: {image_error(exc)}") from None
        ext = path.suffix.lower()
        copyable = mode == "RGB" and _COPYABLE.get(ext) == fmt and not turned
        return rgb, (raw if copyable else None), ext, turned
    try:
        data = item.media.data  # in-memory media: Datumaro gives HWC BGR
    except Exception as exc:
        raise _ItemProblem(f"cannot decode image: {image_error(exc)}") from None
    if data is None:
        raise _ItemProblem("item has no image data")
    data = np.asarray(data)
    if data.ndim == 2:
        data = np.repeat(data[..., None], 3, axis=2)
    return np.ascontiguousarray(data[..., 2::-1].astype(np.uint8)), None, ".png", False


def _paired_mask(
    path: Path, shape: tuple[int, int], table: LabelTable, lossy: int | None = None
) -> tuple[np.ndarray, bool]:
    """The training-id map of a paired mask file, and whether the file itself can be copied: a
    grey 8-bit PNG whose values are already these training ids. Anything else (colours, 16-bit,
    palette, ids that shift) is written anew from the decoded map."""
    values, stored_as_ids = mask_values(path, table, lossy)
    _check_shape(values.shape[:2], shape)
    mask = to_training_ids(values, table)
    return mask, stored_as_ids and path.suffix.lower() == ".png" and np.array_equal(mask, values)


def _compose_mask(item, shape: tuple[int, int], table: LabelTable, fill: int = IGNORE_INDEX) -> np.ndarray:
    """One HxW map of Datumaro's label ids (its labels' positions) from the item's mask
    annotations; uncovered pixels are ``fill`` (ignore, 255, unless the format says what they
    are). The table maps them to training ids."""
    from datumaro.components.annotation import AnnotationType, ExtractedMask

    anns = [a for a in item.annotations if a.type == AnnotationType.mask and a.label is not None]
    if not anns and fill != IGNORE_INDEX:
        return np.full(shape, fill, dtype=np.uint8)  # a defect-free image: all background
    if not anns:
        raise _ItemProblem("image has no segmentation mask")
    undefined = sorted({int(a.label) for a in anns} - {*table.dataset_ids, *table.ignored, IGNORE_INDEX})
    if undefined:
        raise _ItemProblem(f"mask values {undefined} are not in the label map ({', '.join(table.names)}; 255 = ignore)")
    # Masks cut from one index map (Common Semantic Segmentation, VOC, ...) are mapped through a
    # lookup table in one pass instead of one comparison per label.
    by_source: dict[int, list] = {}
    others = []
    for ann in anns:
        if isinstance(ann, ExtractedMask):
            by_source.setdefault(id(ann.index_mask), []).append(ann)
        else:
            others.append(ann)
    mask = None
    try:
        for group in by_source.values():
            source = group[0].index_mask
            index_map = _index_map(source() if callable(source) else source, shape)
            _check_shape(index_map.shape[:2], shape)
            lut = np.full(max(256, int(index_map.max()) + 1), IGNORE_INDEX, dtype=np.uint8)
            for ann in group:
                if int(ann.label) != IGNORE_INDEX:
                    lut[int(ann.index)] = int(ann.label)
            mapped = lut[index_map]
            mask = mapped if mask is None else np.where(mapped != IGNORE_INDEX, mapped, mask)
        if mask is None:
            mask = np.full(shape, IGNORE_INDEX, dtype=np.uint8)
        for ann in others:
            region = np.asarray(ann.image, dtype=bool)
            _check_shape(region.shape, shape)
            if int(ann.label) != IGNORE_INDEX:
                mask[region] = int(ann.label)
    except _ItemProblem:
        raise
    except Exception as exc:
        raise _ItemProblem(f"cannot read mask ({type(exc).__name__}: {exc})") from None
    if fill != IGNORE_INDEX:
        mask[mask == IGNORE_INDEX] = fill
    return mask


def _index_map(values, shape: tuple[int, int]) -> np.ndarray:
    """An index map as whole numbers. SYNTHIA's GTTXT label files reach us through np.loadtxt:
    floats, and 1-D for a one-row image."""
    index_map = np.asarray(values)
    if index_map.ndim == 1 and shape[0] == 1:
        index_map = index_map.reshape(1, -1)
    if index_map.dtype.kind == "f":
        if not np.isfinite(index_map).all() or (np.mod(index_map, 1) != 0).any():
            raise _ItemProblem("mask holds values that are not whole numbers")
        index_map = index_map.astype(np.int64)
    if index_map.size and int(index_map.min()) < 0:
        raise _ItemProblem("mask holds negative values")
    return index_map


def _check_shape(got: tuple[int, ...], want: tuple[int, int]) -> None:
    if tuple(got) != tuple(want):
        raise _ItemProblem(f"mask is {got[1]}x{got[0]} but the image is {want[1]}x{want[0]} (width x height)")
