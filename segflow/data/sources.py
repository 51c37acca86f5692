"""Reading a raw dataset's format: which layout or format a folder holds (Datumaro's detectors,
Common Semantic Segmentation), its items and label names, and the class of pixels no mask covers."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

from segflow.data import IGNORE_INDEX
from segflow.data.labels import LabelTable, read_meta
from segflow.data.layouts import (
    SEGNET_CAMVID,
    PairedItem,
    is_segnet_camvid,
    pair,
)
from segflow.errors import SegflowError
from segflow.storage import walk_files

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


@dataclass
class Source:
    """What a dataset holds, before any item is checked."""

    format: str
    items: list  # PairedItem, or Datumaro's DatasetItem
    table: LabelTable
    fill: int = IGNORE_INDEX  # Datumaro position of the class of pixels no mask covers
    warnings: list[str] = field(default_factory=list)  # images left out, and why


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


def with_masks(items: list, fill: int = IGNORE_INDEX) -> tuple[list, list[str]]:
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
