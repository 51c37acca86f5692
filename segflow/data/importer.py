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

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from segflow.configs import check_numbers
from segflow.data import manifest as manifest_lib
from segflow.data.item_check import ItemJob, check_items
from segflow.data.labels import build_table
from segflow.data.layouts import (
    PAIRED_FOLDERS,
    SEGNET_CAMVID,
    apply_subset_lists,
    is_segnet_camvid,
    paired_folders,
    read_labels,
    segnet_camvid,
)
from segflow.data.sources import (
    CSS,
    CSS_SUBSETS,
    SEGMENTATION_FORMATS,
    Source,
    background_class,
    check_source,
    detect_format,
    label_names,
    load_datumaro,
    load_paired,
    with_masks,
)
from segflow.errors import SegflowError

_SUBSET_ALIASES = {
    "train": "train",
    "training": "train",
    "val": "val",
    "valid": "val",
    "validation": "val",
    "test": "test",
    "testing": "test",
}


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
    job = ItemJob(source.items, placement, table=table, out=out, root=src, fill=source.fill, lossy=lossy)
    results = check_items(job, cfg.workers)
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
    items, unmasked = with_masks(list(dataset), fill)
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


def _meta(labels: list[str]) -> dict:
    # Masks are single-channel label ids, so no colours are needed to read them back.
    return {"label_map": {str(i): name for i, name in enumerate(labels)}}
