"""Import and validate a segmentation dataset into segflow's normalised dataset artifact.

Datumaro reads the source (any of its semantic segmentation formats; Common Semantic
Segmentation first). Every item is then checked and written out in parallel worker processes:
the image decodes completely, it has a mask of the same size, and every mask value names a label
(255 is "ignore"). Only when every item passes is the artifact published:

    OUT/
      train/ val/ [test/]       Common Semantic Segmentation layout per subset
        dataset_meta.json
        images/<name>.<ext>     original bytes when already RGB PNG/JPEG, else re-encoded PNG
        masks/<name>.png        single channel, pixel = label id, 255 = ignore
      manifest.json             labels, per-file sha256, counts, statistics, fingerprint
      report.json report.md class_distribution.png

A failure lists every problem found, names the files, and leaves no OUT behind.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from segflow.configs import check_numbers
from segflow.data import IGNORE_INDEX
from segflow.data import manifest as manifest_lib
from segflow.data.datasets import image_error
from segflow.data.labels import LabelTable, MaskProblem, build_table, mask_values, read_meta, to_training_ids
from segflow.data.layouts import (
    PAIRED_FOLDERS,
    SEGNET_CAMVID,
    PairedItem,
    apply_subset_lists,
    is_segnet_camvid,
    pair,
    paired_folders,
    read_labels,
    segnet_camvid,
)
from segflow.data.manifest import ItemResult
from segflow.errors import SegflowError
from segflow.parallel import map_all
from segflow.storage import confined, walk_files

CSS = "common_semantic_segmentation"
CSS_SUBSETS = "common_semantic_segmentation_with_subset_dirs"
SEGMENTATION_FORMATS = (
    CSS,
    CSS_SUBSETS,
    "voc_segmentation",
    "voc",
    "cityscapes",
    "ade20k2017",
    "ade20k2020",
    "camvid",
    "mapillary_vistas",
    "kitti_segmentation",
    "synthia_rand",
    "synthia_sf",
    "synthia_al",
    "coco_stuff",
    "mvtec_segmentation",
)
# Formats whose masks are per object (instances); Datumaro converts them to semantic layouts.
INSTANCE_FORMATS = ("coco", "coco_instances", "coco_panoptic", "label_me", "mots", "mots_png", "cvat", "datumaro")
_SUBSET_ALIASES = {
    "train": "train",
    "training": "train",
    "val": "val",
    "valid": "val",
    "validation": "val",
    "test": "test",
    "testing": "test",
}
_COPYABLE = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG"}
_EXIF_ORIENTATION = 0x0112
# Serial below this many items: forking workers costs more than it saves.
_MIN_PARALLEL_ITEMS = 48

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ImportConfig:
    """Settings of the import stage (the CLI flags and the KFP component's parameters)."""

    source: str
    out: str
    format: str | None = None
    val_fraction: float = 0.2
    seed: int = 0
    workers: int = 0  # 0: one per available core
    overwrite: bool = False
    imbalance_ratio: float = 100.0  # warn when the most common class has this many times the pixels of the rarest
    ignore_labels: tuple[str, ...] = ()  # classes read as "ignore" (255), e.g. void
    # Plain paired folders: ``source`` is the image folder, ``masks`` the mask folder.
    masks: str = ""
    labels: str = ""  # a,b,c; a file of one name per line; or a dataset_meta.json
    mask_suffix: str = ""  # a_mask.png beside a.jpg: "_mask"
    colors: str = ""  # JSON list of [R, G, B] per label id, for colour masks
    lossy_masks: int = -1  # -1: JPEG masks refused; N: accepted, values snapped to a label within N
    subset_lists: tuple[str, ...] = ()  # paired folders: train.txt, val.txt ... (one image name per line)
    reader_options: tuple[str, ...] = ()  # KEY=VALUE for the reader (Datumaro's importer, or prefixes)

    def reader_kwargs(self) -> dict:
        """``reader_options`` as keyword arguments: true/false and numbers typed, the rest strings."""
        parsed = {}
        for option in self.reader_options:
            key, sep, value = option.partition("=")
            if not sep or not key.isidentifier():
                raise SegflowError(f"--option {option!r}: write KEY=VALUE, e.g. --option mask_prefix=gt_.")
            lowered = value.lower()
            if lowered in ("true", "false"):
                parsed[key] = lowered == "true"
            else:
                try:
                    parsed[key] = int(value)
                except ValueError:
                    parsed[key] = value
        return parsed

    def validate(self) -> None:
        check_numbers(self)
        if bool(self.masks) != bool(self.labels):
            raise SegflowError("plain paired folders need both --masks DIR and --labels (a,b,c or a file).")
        if not -1 <= self.lossy_masks <= 255:
            raise SegflowError(f"--lossy-masks must be a distance from 0 to 255 (got {self.lossy_masks}).")
        if (self.mask_suffix or self.colors or self.subset_lists) and not self.masks:
            raise SegflowError(
                "--mask-suffix, --colors and --subset-list go with --images DIR --masks DIR --labels ..."
            )
        if str(self.source).rstrip("/") == str(self.out).rstrip("/"):
            raise SegflowError("SRC and OUT are the same place: write the imported dataset somewhere else.")
        if not 0.0 < self.val_fraction < 1.0:
            raise SegflowError(f"--val-fraction must be between 0 and 1, exclusive (got {self.val_fraction}).")
        if self.workers < 0:
            raise SegflowError(f"--workers must be 0 (all cores) or more (got {self.workers}).")
        if self.format and self.format not in (SEGNET_CAMVID,):
            from datumaro.components.environment import DEFAULT_ENVIRONMENT

            if self.format not in DEFAULT_ENVIRONMENT.importers:
                raise SegflowError(
                    f"--format {self.format!r} is not a Datumaro format. Segmentation formats: "
                    + ", ".join(SEGMENTATION_FORMATS)
                )


@dataclass(frozen=True)
class _Job:
    """Everything a worker needs; inherited by forked workers instead of pickled."""

    items: list  # PairedItem, or Datumaro's DatasetItem for the formats Datumaro reads
    placement: list[tuple[str, str]]  # (subset, output name) per item
    table: LabelTable
    out: Path
    root: Path
    fill: int = IGNORE_INDEX  # Datumaro position of the class of pixels no mask covers (MVTec's "good")
    lossy: int | None = None  # JPEG masks: snap to the nearest label within this distance


_JOB: _Job | None = None


def import_dataset(cfg: ImportConfig, src: Path, out: Path, masks: Path | None = None) -> dict:
    """Import the raw dataset in ``src`` into the empty folder ``out``; return the report (also
    written to OUT/report.json). ``masks``: plain paired folders (``src`` holds the images).
    ``cfg.source`` and ``cfg.out`` are only recorded."""
    cfg.validate()
    check_source(src)
    source = read_source(cfg, src, masks)
    fmt, table = source.format, source.table
    labels = list(table.names)
    placement = assign_subsets(source.items, cfg.val_fraction, cfg.seed)
    lossy = None if cfg.lossy_masks < 0 else cfg.lossy_masks
    job = _Job(source.items, placement, table=table, out=out, root=src, fill=source.fill, lossy=lossy)
    results = _run_items(job, cfg.workers)
    problems = [p for r in results for p in r.problems]
    if problems:
        raise SegflowError(
            f"{cfg.source}: {len(problems)} problem(s) in the dataset; nothing was written. "
            "Fix or remove these files and import again:",
            problems=problems,
        )
    for subset in sorted({r.subset for r in results}):
        (out / subset / "dataset_meta.json").write_text(json.dumps(_meta(labels), indent=2) + "\n")
    manifest = manifest_lib.build(results, labels, source=str(cfg.source), data_format=fmt)
    manifest["label_ids"] = table.as_manifest()  # training id -> the dataset's own id
    report = manifest_lib.build_report(manifest, results, cfg.imbalance_ratio)
    report["warnings"] += source.warnings
    if "val" not in report["counts"]:
        report["warnings"].append(
            f"no val subset: {sum(report['counts'].values())} image(s) are too few to split one off; training "
            "will have nothing to validate on. Add images, or a val/ subset."
        )
    oriented = [r.source_path for r in results if r.oriented]
    if oriented:
        report["warnings"].append(
            f"{len(oriented)} image(s) carry an EXIF orientation and were turned to it, as viewers show them "
            f"(masks are read as stored), e.g. {', '.join(oriented[:3])}"
        )
    manifest_lib.write(out, manifest, report)
    report["output"] = str(cfg.out)
    report["metrics"] = {
        **{f"images_{name}": n for name, n in report["counts"].items()},
        "labels": len(report["labels"]),
        "warnings": len(report["warnings"]),
    }
    for warning in report["warnings"]:
        log.warning("%s", warning)
    return report


# --- reading the source -----------------------------------------------------------------------


@dataclass
class Source:
    """What a dataset holds, before any item is checked."""

    format: str
    items: list  # PairedItem, or Datumaro's DatasetItem
    table: LabelTable
    fill: int = IGNORE_INDEX  # Datumaro position of the class of pixels no mask covers
    warnings: list[str] = field(default_factory=list)  # images left out, and why


def read_source(cfg: ImportConfig, src: Path, masks: Path | None) -> Source:
    """The items and label table of ``src``: plain paired folders when ``masks`` is given, else
    the layout ``cfg.format`` names or detection finds. Layouts of paired files are read by
    segflow (segflow.data.layouts), every other format by Datumaro."""
    fmt = PAIRED_FOLDERS if masks is not None else cfg.format or detect_format(src)
    if fmt == "camvid" and is_segnet_camvid(src):  # SegNet's release, not Datumaro's CamVid layout
        fmt = SEGNET_CAMVID
    if fmt == PAIRED_FOLDERS:
        table = read_labels(cfg.labels, cfg.colors, cfg.ignore_labels)
        items, unlisted = apply_subset_lists(paired_folders(src, masks, cfg.mask_suffix), cfg.subset_lists)
        source = Source(fmt, items, table)
        if unlisted:
            source.warnings.append(
                f"{len(unlisted)} image(s) are in none of the --subset-list files and were left out, "
                f"e.g. {', '.join(unlisted[:3])}"
            )
    elif fmt == SEGNET_CAMVID:
        source = Source(fmt, *segnet_camvid(src, cfg.ignore_labels))
    elif fmt in (CSS, CSS_SUBSETS):
        source = Source(fmt, *load_paired(src, fmt, cfg.ignore_labels, cfg.reader_kwargs()))
    else:
        source = _datumaro_source(cfg, src, fmt)
    if not source.items:
        raise SegflowError(f"{cfg.source}: the dataset is empty (no items as {fmt}).")
    return source


def _datumaro_source(cfg: ImportConfig, src: Path, fmt: str) -> Source:
    dataset, fmt = load_datumaro(src, fmt, cfg.reader_kwargs())
    by_position = dict(enumerate(label_names(dataset, src, fmt)))  # Datumaro's label ids are positions
    table = build_table(by_position, {}, cfg.ignore_labels, f"{src} ({fmt})")
    fill = background_class(dataset, fmt, src)
    items, unmasked = _with_masks(list(dataset), fill)
    if unmasked and not items:
        raise SegflowError(
            f"{cfg.source}: none of the {len(unmasked)} images read as {fmt} has a segmentation mask. Is it a "
            "detection or classification dataset? Pass --format, one of: " + ", ".join(SEGMENTATION_FORMATS)
        )
    source = Source(fmt, items, table, fill)
    if unmasked:
        source.warnings.append(
            f"{len(unmasked)} image(s) have no segmentation mask in this {fmt} dataset and were left out "
            f"(formats such as VOC annotate a part of their images only), e.g. {', '.join(unmasked[:3])}"
        )
    return source


# --- reading with Datumaro --------------------------------------------------------------------


def detect_format(src: Path) -> str:
    """Name the format of ``src``: SegNet's CamVid release and Common Semantic Segmentation are
    recognised first (segflow reads both itself), then Datumaro is asked."""
    if is_segnet_camvid(src):
        return SEGNET_CAMVID
    # images/ and masks/ make this layout; a dataset_meta.json alone does not (ADE20K, SYNTHIA and
    # any Datumaro export with --save-dataset-meta have one too).
    if (src / "images").is_dir() and (src / "masks").is_dir():
        return CSS
    subset_dirs = [d for d in src.iterdir() if d.is_dir() and (d / "images").is_dir() and (d / "masks").is_dir()]
    if subset_dirs:
        return CSS_SUBSETS
    import datumaro as dm
    from datumaro.components.errors import MultipleFormatsMatchError, NoMatchingFormatsError

    try:
        detected = dm.Dataset.detect(str(src))
    except NoMatchingFormatsError:
        raise SegflowError(
            f"{src} is not a dataset Datumaro recognises. For Common Semantic Segmentation it needs "
            "dataset_meta.json, images/ and masks/; for other layouts pass --format, one of: "
            + ", ".join(SEGMENTATION_FORMATS)
        ) from None
    except MultipleFormatsMatchError as exc:
        # e.g. VOC matches both its semantic and its instance flavour: take the semantic one.
        preferred = [f for f in SEGMENTATION_FORMATS if f in exc.formats]
        if preferred:
            return preferred[0]
        raise SegflowError(
            f"{src} matches several formats ({', '.join(sorted(exc.formats))}): pass --format to choose one."
        ) from None
    if detected in INSTANCE_FORMATS:
        raise SegflowError(
            f"{src} looks like a {detected!r} dataset to Datumaro: instance annotations (polygons and masks per "
            "object), which segflow does not import as semantic masks. Convert it with Datumaro first, e.g. "
            f"`datum convert -if {detected} -i {src} -f voc_segmentation -o VOC -- --save-media`, then import VOC "
            "(for COCO-Stuff, pass --format coco_stuff)."
        )
    if detected not in SEGMENTATION_FORMATS:
        raise SegflowError(
            f"{src} looks like a {detected!r} dataset to Datumaro, which holds no segmentation masks. "
            "If it is a segmentation dataset, pass --format, one of: " + ", ".join(SEGMENTATION_FORMATS)
        )
    return detected


def background_class(dataset, fmt: str, src: Path) -> int:
    """MVTec's masks mark defects only: the pixels they do not cover, and the images without a
    mask, are the defect-free class ("good", or the one class that never has a mask). Other
    formats: 255, uncovered pixels are ignored."""
    from datumaro.components.annotation import AnnotationType

    if not fmt.startswith("mvtec"):
        return IGNORE_INDEX
    names = label_names(dataset, src, fmt)
    if "good" in names:
        return names.index("good")
    masked = {a.label for item in dataset for a in item.annotations if a.type == AnnotationType.mask}
    labelled = {a.label for item in dataset for a in item.annotations if a.type == AnnotationType.label}
    unmasked = sorted(labelled - masked)
    if len(unmasked) != 1:
        raise SegflowError(
            f"{src}: cannot tell MVTec's defect-free class (no label named 'good', and {len(unmasked)} labels "
            "never have a mask): rename its folder to good."
        )
    return int(unmasked[0])


def _with_masks(items: list, fill: int = IGNORE_INDEX) -> tuple[list, list[str]]:
    """Datumaro's items that carry a segmentation mask (any item when uncovered pixels have a
    class), and the ids of those that do not."""
    from datumaro.components.annotation import AnnotationType

    kept, unmasked = [], []
    for item in items:
        has_mask = fill != IGNORE_INDEX or any(a.type == AnnotationType.mask for a in item.annotations)
        (kept if has_mask else unmasked).append(item if has_mask else str(item.id))
    return kept, unmasked


def check_source(src: Path) -> None:
    if src.is_file():
        raise SegflowError(f"{src} is a file: point SRC at the dataset's folder.")
    if not any(src.iterdir()):
        raise SegflowError(f"{src} is an empty folder: there is no dataset to import.")
    walk_files(src)  # refuses symbolic link loops and links out of the dataset before anything walks it


def load_paired(
    src: Path, fmt: str, ignore_labels: tuple[str, ...], options: dict | None = None
) -> tuple[list[PairedItem], LabelTable]:
    """Common Semantic Segmentation (flat, or one folder per subset), read by segflow: the items
    (image and mask paired by name) and the label table of ``dataset_meta.json``. Datumaro's own
    reader numbers the labels by their order in the file and takes colour masks' ids as they come,
    so this layout is read here, by id (segflow.data.labels). ``options``: image_prefix and
    mask_prefix (Datumaro's names for them), e.g. ``image_`` and ``gt_``."""
    options = dict(options or {})
    prefixes = {k: str(options.pop(k, "")) for k in ("image_prefix", "mask_prefix")}
    if options:
        raise SegflowError(f"--option {sorted(options)}: {fmt} takes image_prefix and mask_prefix only.")
    roots = [src] if fmt == CSS else sorted(d for d in src.iterdir() if d.is_dir() and not d.name.startswith("."))
    items: list[PairedItem] = []
    table = None
    for root in roots:
        items += css_items(root, "" if fmt == CSS else root.name, **prefixes)
        root_table = read_meta(root / "dataset_meta.json", tuple(ignore_labels))
        if table is not None and (root_table.names, root_table.dataset_ids) != (table.names, table.dataset_ids):
            raise SegflowError(
                f"{root / 'dataset_meta.json'} names other labels than {roots[0] / 'dataset_meta.json'}: "
                "every subset of a dataset must share one label map."
            )
        table = root_table
    if table is None:
        raise SegflowError(f"{src}: no subset folders with dataset_meta.json, images/ and masks/.")
    return items, table


def load_datumaro(src: Path, fmt: str, options: dict | None = None):
    """Import ``src`` with Datumaro (``options``: its importer's keyword arguments); return
    (dataset, format name)."""
    import datumaro as dm

    logging.getLogger("datumaro").setLevel(logging.ERROR)
    try:
        dataset = dm.Dataset.import_from(str(src), fmt, **(options or {}))
        len(dataset)  # Datumaro imports lazily: force it here, where errors can be explained
    except SegflowError:
        raise
    except Exception as exc:
        raise SegflowError(f"{src}: Datumaro could not read the dataset as {fmt}: {_reasons(exc)}") from None
    return dataset, fmt


def _reasons(exc: BaseException) -> str:
    """The exception and what caused it, innermost last: Datumaro wraps the real reason
    ("Failed to import dataset 'camvid'" says nothing by itself)."""
    chain, seen = [], set()
    while exc is not None and id(exc) not in seen and len(chain) < 4:
        seen.add(id(exc))
        chain.append(f"{type(exc).__name__}: {str(exc)[:300]}")
        exc = exc.__cause__ or exc.__context__
    return " <- ".join(chain)


def label_names(dataset, src: Path, fmt: str) -> list[str]:
    from datumaro.components.annotation import AnnotationType

    categories = dataset.categories().get(AnnotationType.label)
    names = [c.name for c in categories] if categories else []
    if not names:
        raise SegflowError(
            f"{src}: the dataset declares no labels when read as {fmt!r}. Is it a segmentation dataset? "
            "Pass --format, one of: " + ", ".join(SEGMENTATION_FORMATS)
        )
    if len(names) >= IGNORE_INDEX:
        raise SegflowError(f"{src}: {len(names)} labels; at most {IGNORE_INDEX - 1} fit in 8-bit masks.")
    return names


def css_items(root: Path, subset: str, image_prefix: str = "", mask_prefix: str = "") -> list[PairedItem]:
    """The pairs of one Common Semantic Segmentation folder, every layout problem at once."""
    meta = root / "dataset_meta.json"
    if not meta.exists():
        raise SegflowError(
            f"{meta} is missing. Common Semantic Segmentation needs it to name the labels, e.g. "
            '{"label_map": {"0": "background", "1": "car"}}.'
        )
    items = pair(root / "images", root / "masks", subset, "", image_prefix, mask_prefix)
    if not items:
        raise SegflowError(f"{root}: the dataset is empty (no images in {root / 'images'}).")
    return items


# --- subsets --------------------------------------------------------------------------------


def assign_subsets(items: list, val_fraction: float, seed: int) -> list[tuple[str, str]]:
    """(subset, output name) per item. Existing train/val/test subsets are kept; the rest are
    pooled into train, and a val subset is split off deterministically when there is none."""
    subsets = [_SUBSET_ALIASES.get((item.subset or "").lower(), "train") for item in items]
    if "val" not in subsets:
        pool = sorted(
            (i for i, s in enumerate(subsets) if s == "train"), key=lambda i: (items[i].subset or "", items[i].id)
        )
        if len(pool) >= 2:
            order = np.random.default_rng(seed).permutation(len(pool))
            n_val = min(len(pool) - 1, max(1, round(len(pool) * val_fraction)))
            for k in order[:n_val]:
                subsets[pool[k]] = "val"
    placement: list[tuple[str, str]] = []
    taken: set[tuple[str, str]] = set()
    for item, subset in zip(items, subsets, strict=True):
        name = str(item.id).replace("\\", "/").replace("/", "__")
        if (subset, name) in taken:  # same id in two pooled source subsets
            name = f"{item.subset}__{name}"
        taken.add((subset, name))
        placement.append((subset, name))
    return placement


# --- per-item work (runs in worker processes) -----------------------------------------------


def _run_items(job: _Job, workers: int) -> list[ItemResult]:
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


def _display(path: str | None, job: _Job, fallback: str) -> str:
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


def _meta(labels: list[str]) -> dict:
    # Masks are single-channel label ids, so no colours are needed to read them back.
    return {"label_map": {str(i): name for i, name in enumerate(labels)}}
