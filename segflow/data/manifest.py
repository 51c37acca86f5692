"""The dataset artifact's manifest, its fingerprint, and the human-readable import report.

The fingerprint is the sha256 of the label list and every file's path and sha256, nothing else:
the same content gives the same fingerprint wherever and whenever it was imported, so it names a
dataset version, keys caches and tells the scheduler whether data is new.
"""

from __future__ import annotations

import base64
import hashlib
import json
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from segflow.data import IGNORE_INDEX
from segflow.errors import SegflowError
from segflow.storage import confined, read_json, sha256_file, walk_files

SCHEMA = "segflow.dataset/1"
MANIFEST = "manifest.json"
SUBSET_ORDER = ("train", "val", "test")


@dataclass
class ItemResult:
    """What one worker learned about one item; small and picklable."""

    subset: str
    name: str
    problems: list[str] = field(default_factory=list)
    files: dict[str, str] = field(default_factory=dict)  # relative path -> sha256
    image_sha256: str = ""
    source_path: str = ""
    height: int = 0
    width: int = 0
    oriented: bool = False  # the image carried an EXIF orientation and was turned to it
    label_pixels: np.ndarray | None = None  # 256 bins: label ids, 255 = ignore
    channel_histogram: np.ndarray | None = None  # 3x256 counts of each RGB value


def fingerprint(labels: list[str], files: dict[str, str]) -> str:
    canonical = json.dumps({"labels": labels, "files": files}, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


def dataset_ids(manifest: dict) -> list[int]:
    """Training id -> the dataset's own label id (identity for artifacts imported before ids were kept)."""
    return list(manifest.get("label_ids", {}).get("dataset_ids") or range(len(manifest["labels"])))


def _ordered(subsets) -> list[str]:
    return sorted(subsets, key=lambda s: (SUBSET_ORDER.index(s) if s in SUBSET_ORDER else 99, s))


def build(results: list[ItemResult], labels: list[str], source: str, data_format: str) -> dict:
    """Manifest of a validated import: labels, files and checksums, counts and statistics."""
    files = {rel: sha for r in results for rel, sha in sorted(r.files.items())}
    files = dict(sorted(files.items()))
    n = len(labels)
    subsets: dict[str, dict] = {}
    for subset in _ordered({r.subset for r in results}):
        rows = [r for r in results if r.subset == subset]
        pixels = np.sum([r.label_pixels for r in rows], axis=0)
        present = np.sum([r.label_pixels[:n] > 0 for r in rows], axis=0)
        subsets[subset] = {
            "count": len(rows),
            "items": sorted(r.name for r in rows),
            "label_pixels": [int(v) for v in pixels[:n]],
            "label_images": [int(v) for v in present],
            "ignore_pixels": int(pixels[255]),
        }
    stats_rows = [r for r in results if r.subset == "train"] or results
    histogram = np.sum([r.channel_histogram for r in stats_rows], axis=0).astype(np.float64)  # 3x256
    values = np.arange(256, dtype=np.float64)
    count = histogram.sum(axis=1)
    mean = histogram @ values / count
    var = histogram @ values**2 / count - mean**2
    heights = [r.height for r in results]
    widths = [r.width for r in results]
    return {
        "schema": SCHEMA,
        "fingerprint": fingerprint(labels, files),
        "labels": labels,
        "ignore_index": IGNORE_INDEX,
        "source": {"uri": source, "format": data_format},
        "subsets": subsets,
        "statistics": {
            # RGB mean and std of the train images on a 0-255 scale: the model's normalisation.
            "mean": [round(float(v), 4) for v in mean],
            "std": [round(float(v), 4) for v in np.sqrt(np.maximum(var, 0.0))],
            "min_size": [min(heights), min(widths)],
            "max_size": [max(heights), max(widths)],
        },
        "files": files,
    }


def find_warnings(manifest: dict, results: list[ItemResult], imbalance_ratio: float) -> list[str]:
    """Things that do not stop an import but that a user should know about."""
    labels = manifest["labels"]
    total = np.sum([s["label_pixels"] for s in manifest["subsets"].values()], axis=0)
    warnings = [f"label {name!r} (id {i}) never occurs in any mask" for i, name in enumerate(labels) if total[i] == 0]
    present = [(int(total[i]), name) for i, name in enumerate(labels) if total[i] > 0]
    if len(present) >= 2:
        (low, rare), (high, common) = min(present), max(present)
        if high / low > imbalance_ratio:
            warnings.append(
                f"class imbalance: {common!r} has {high / low:.0f}x the pixels of {rare!r} "
                f"(threshold {imbalance_ratio:g}); consider more data of the rare class"
            )
    val = manifest["subsets"].get("val")
    if val:
        missing = [labels[i] for i in range(len(labels)) if total[i] > 0 and val["label_pixels"][i] == 0]
        if missing:
            warnings.append(f"labels {missing} occur in training data but not in val: their val scores are undefined")
        if val["count"] < 5:
            warnings.append(f"val holds only {val['count']} image(s): validation metrics will be noisy")
    groups: dict[str, list[str]] = defaultdict(list)
    for r in results:
        groups[r.image_sha256].append(r.source_path)
    for paths in groups.values():
        if len(paths) > 1:
            warnings.append(f"{len(paths)} byte-identical images: {', '.join(sorted(paths)[:5])}")
    return warnings


def build_report(manifest: dict, results: list[ItemResult], imbalance_ratio: float) -> dict:
    return {
        "fingerprint": manifest["fingerprint"],
        "source": manifest["source"],
        "labels": manifest["labels"],
        "counts": {name: s["count"] for name, s in manifest["subsets"].items()},
        "subsets": {name: {k: v for k, v in s.items() if k != "items"} for name, s in manifest["subsets"].items()},
        "statistics": manifest["statistics"],
        "warnings": find_warnings(manifest, results, imbalance_ratio),
    }


def plot_class_distribution(report: dict, out_png: Path) -> Path:
    """Bar chart: share of labelled pixels per class, one bar group per subset."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = report["labels"]
    subsets = list(report["subsets"])
    x = np.arange(len(labels))
    width = 0.8 / max(len(subsets), 1)
    fig, ax = plt.subplots(figsize=(max(6.0, 0.6 * len(labels) + 2), 3.6), dpi=100)
    for k, name in enumerate(subsets):
        pixels = np.asarray(report["subsets"][name]["label_pixels"], dtype=np.float64)
        share = 100 * pixels / max(pixels.sum(), 1)
        ax.bar(x + (k - (len(subsets) - 1) / 2) * width, share, width, label=f"{name} ({report['counts'][name]})")
    ax.set_xticks(x, labels, rotation=30, ha="right")
    ax.set_ylabel("% of labelled pixels")
    ax.set_title("Class distribution")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out_png)
    plt.close(fig)
    return out_png


def render_markdown(report: dict, plot_png: Path | None = None, embed_plot: bool = False) -> str:
    """The report as Markdown; ``embed_plot`` inlines the PNG (for the KFP UI, which has no files)."""
    labels = report["labels"]
    subsets = list(report["subsets"])
    lines = [
        "# Dataset import report",
        "",
        f"- Source: `{report['source']['uri']}` (format `{report['source']['format']}`)",
        f"- Fingerprint: `{report['fingerprint']}`",
        "- Images: " + ", ".join(f"{name} {n}" for name, n in report["counts"].items()),
        f"- Image sizes (HxW): {report['statistics']['min_size']} to {report['statistics']['max_size']}",
        "",
        "## Classes",
        "",
        "| id | label | " + " | ".join(f"{s} pixels % | {s} images" for s in subsets) + " |",
        "|---|---|" + "---|---|" * len(subsets),
    ]
    for i, name in enumerate(labels):
        cells = []
        for s in subsets:
            pixels = report["subsets"][s]["label_pixels"]
            cells.append(f"{100 * pixels[i] / max(sum(pixels), 1):.2f} | {report['subsets'][s]['label_images'][i]}")
        lines.append(f"| {i} | {name} | " + " | ".join(cells) + " |")
    lines += ["", "## Warnings", ""]
    lines += [f"- {w}" for w in report["warnings"]] or ["None."]
    if plot_png is not None:
        if embed_plot:
            data = base64.b64encode(Path(plot_png).read_bytes()).decode()
            lines += ["", f"![class distribution](data:image/png;base64,{data})"]
        else:
            lines += ["", f"![class distribution]({Path(plot_png).name})"]
    return "\n".join(lines) + "\n"


def write(folder: Path, manifest: dict, report: dict) -> None:
    folder = Path(folder)
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
    (folder / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    plot = plot_class_distribution(report, folder / "class_distribution.png")
    (folder / "report.md").write_text(render_markdown(report, plot))


def read(folder: str | Path, verify: bool = False) -> dict:
    """Load and check the manifest of a dataset artifact folder.

    ``verify``: also check every file against the sha256 the manifest lists, so a damaged or
    changed file fails here with its name instead of somewhere inside training. Hashing costs a
    small fraction of decoding the same files (benchmarks/RESULTS.md).
    """
    path = Path(folder) / MANIFEST
    if not path.exists():
        raise SegflowError(f"{folder} is not a segflow dataset (no {MANIFEST}): run `segflow data import` first.")
    manifest = read_json(path, "import the dataset again")
    if not isinstance(manifest, dict) or manifest.get("schema") != SCHEMA:
        manifest = manifest if isinstance(manifest, dict) else {}
        raise SegflowError(f"{path}: schema {manifest.get('schema')!r} is not {SCHEMA!r}: import the dataset again.")
    if verify:
        verify_files(Path(folder), manifest["files"])
    return manifest


def verify_files(folder: Path, files: dict[str, str]) -> None:
    """Every listed file exists inside ``folder`` and has its recorded sha256. Serial: for files
    of a few hundred KB, a thread pool costs more than it saves (benchmarks/reliability.py)."""
    walk_files(folder)  # refuses symbolic links out of the folder, once for all files
    problems = []
    for rel, expected in files.items():
        path = confined(folder, rel, f"manifest entry {rel!r}", links=False)
        if not path.is_file():
            problems.append(f"{path}: listed in the manifest but missing")
        elif sha256_file(path) != expected:
            problems.append(f"{path}: content differs from the manifest's sha256 (damaged or changed after import)")
    if problems:
        raise SegflowError(
            f"{folder}: {len(problems)} file(s) do not match the dataset's manifest. Import the dataset again "
            "(or restore the files):",
            problems=problems,
        )
