"""The layouts users really have, read by segflow: images and masks paired by file name.

- **Common Semantic Segmentation** (Datumaro's layout): ``dataset_meta.json``, ``images/``,
  ``masks/``, flat or one folder per subset.
- **SegNet's CamVid release** (the SegNet tutorial's ``CamVid/``): ``train/ val/ test/`` images
  beside ``trainannot/ valannot/ testannot/`` masks of ids 0-10, 11 = void (ignored).
- **Plain paired folders**: an image folder, a mask folder whose files share the images' names
  (``--mask-suffix _mask`` for ``a_mask.png`` beside ``a.jpg``), and the class names
  (``--labels a,b,c``, a text file of one name per line, or a ``dataset_meta.json``).

Each gives :class:`PairedItem` objects and a :class:`~segflow.data.labels.LabelTable`; the
importer decodes and checks every pair.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from segflow.data.labels import LabelTable, build_table, read_meta, rgb
from segflow.errors import SegflowError
from segflow.storage import read_json, walk_files

SEGNET_CAMVID = "segnet_camvid"
PAIRED_FOLDERS = "paired_folders"
# The class order of SegNet's CamVid annotations (its tutorial's Scripts/test_segmentation_camvid.py).
CAMVID_CLASSES = (
    "Sky", "Building", "Pole", "Road", "Pavement", "Tree", "SignSymbol", "Fence", "Car", "Pedestrian", "Bicyclist",
)  # fmt: skip
CAMVID_VOID = 11
SUBSETS = ("train", "val", "test")
# Images segflow reads in full (PIL): a GIF or a multi-page TIFF is named, not half-read.
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")
UNREADABLE_SUFFIXES = (".gif",)


@dataclass(frozen=True)
class PairedItem:
    """An image and its mask file, paired by name."""

    id: str
    subset: str
    image: Path
    mask: Path

    @property
    def media(self):
        return self  # has .path, like a Datumaro media object

    @property
    def path(self) -> str:
        return str(self.image)


def files_by_stem(folder: Path, suffix: str = "", prefix: str = "") -> dict[str, Path]:
    """Image files below ``folder`` by their path without extension, relative to ``folder``,
    without ``suffix`` (``_mask``) and ``prefix`` (``gt_``); names without the prefix are not
    part of the dataset."""
    if not folder.is_dir():
        return {}
    found = {}
    for path in walk_files(folder):
        if path.suffix.lower() not in IMAGE_SUFFIXES + UNREADABLE_SUFFIXES or not path.name.startswith(prefix):
            continue
        stem = path.relative_to(folder).with_suffix("").as_posix()
        if prefix:
            head, _, name = stem.rpartition("/")
            stem = f"{head}/{name[len(prefix) :]}" if head else name[len(prefix) :]
        if suffix and stem.endswith(suffix):
            stem = stem[: -len(suffix)]
        found[stem] = path
    return dict(sorted(found.items()))


def pair(
    images_dir: Path,
    masks_dir: Path,
    subset: str,
    mask_suffix: str = "",
    image_prefix: str = "",
    mask_prefix: str = "",
) -> list[PairedItem]:
    """Every image of ``images_dir`` with its mask in ``masks_dir``; every problem at once."""
    images = files_by_stem(images_dir, prefix=image_prefix)
    masks = files_by_stem(masks_dir, mask_suffix, mask_prefix)
    problems = [f"{p}: file is empty (0 bytes)" for p in [*images.values(), *masks.values()] if p.stat().st_size == 0]
    problems += [
        f"{p}: {p.suffix[1:].upper()} images cannot be read in full (animated or paletted); convert to PNG"
        for p in [*images.values(), *masks.values()]
        if p.suffix.lower() in UNREADABLE_SUFFIXES
    ]
    expected = f"{masks_dir.name}/{mask_prefix}NAME{mask_suffix}.png"
    problems += [f"{images[s]}: image has no mask (expected {expected})" for s in sorted(images.keys() - masks.keys())]
    problems += [f"{masks[s]}: mask has no image in {images_dir}" for s in sorted(masks.keys() - images.keys())]
    if problems:
        raise SegflowError(f"{images_dir}: {len(problems)} problem(s); nothing was written:", problems=problems)
    return [PairedItem(stem.replace("/", "__"), subset, images[stem], masks[stem]) for stem in images]


# --- SegNet's CamVid release ---------------------------------------------------------------------


def is_segnet_camvid(src: Path) -> bool:
    """X/ beside Xannot/ with grey masks of ids. Datumaro's CamVid layout has the same folders
    but colour masks (and may have label_colors.txt): that one Datumaro reads."""
    from PIL import Image

    annots = [src / f"{s}annot" for s in SUBSETS if (src / s).is_dir() and (src / f"{s}annot").is_dir()]
    if not annots or (src / "label_colors.txt").exists():
        return False
    first = next((p for folder in annots for p in sorted(folder.glob("*.png"))), None)
    try:
        with Image.open(first) as mask:
            return mask.mode == "L"
    except Exception:  # no mask, or not an image: not this layout
        return False


def segnet_camvid(src: Path, ignore: tuple[str, ...] = ()) -> tuple[list[PairedItem], LabelTable]:
    by_id = dict(enumerate(CAMVID_CLASSES)) | {CAMVID_VOID: "void"}
    table = build_table(by_id, {}, tuple(dict.fromkeys((*ignore, "void"))), f"{src} (SegNet CamVid)")
    items = [
        item
        for subset in SUBSETS
        if (src / subset).is_dir()
        for item in pair(src / subset, src / f"{subset}annot", subset)
    ]
    return items, table


# --- plain paired folders ------------------------------------------------------------------------


def read_labels(spec: str, colors_file: str = "", ignore: tuple[str, ...] = ()) -> LabelTable:
    """The label table of ``--labels``: ``a,b,c`` (ids 0, 1, 2), a text file of one name per
    line, or a ``dataset_meta.json``; ``--colors FILE``: a JSON list of [R, G, B] per id."""
    path = Path(spec)
    if path.is_file() and path.suffix.lower() == ".json":
        if colors_file:
            raise SegflowError(f"--colors: {spec} is a dataset_meta.json, which holds its colours itself.")
        return read_meta(path, ignore)
    if path.is_file():
        names = [line.strip() for line in path.read_text().splitlines() if line.strip()]
        where = str(path)
    else:
        names = [n.strip() for n in spec.split(",") if n.strip()]
        where = "--labels"
    if not names:
        raise SegflowError(f"--labels {spec!r} names no classes: give a,b,c, or a file of one name per line.")
    colors = {}
    if colors_file:
        values = read_json(colors_file, "give a JSON list of [R, G, B], one per label id")
        if not isinstance(values, list) or len(values) < len(names):
            raise SegflowError(f"--colors {colors_file}: give a JSON list of [R, G, B], one per label ({len(names)}).")
        colors = {i: rgb(color, f"--colors {colors_file}: entry {i}") for i, color in enumerate(values[: len(names)])}
    return build_table(dict(enumerate(names)), colors, ignore, where)


def apply_subset_lists(items: list[PairedItem], lists: tuple[str, ...]) -> tuple[list[PairedItem], list[str]]:
    """Subsets from list files: ``train.txt`` names the train images, one per line (its first
    word, a name or a path, e.g. SegNet's ``/SegNet/CamVid/train/a.png /SegNet/.../a.png``).
    Returns the listed items with their subsets, and the names of those no list holds."""
    if not lists:
        return items, []
    subset_of: dict[str, str] = {}
    for path in map(Path, lists):
        if not path.is_file():
            raise SegflowError(f"--subset-list {path} does not exist: give a text file of image names, one per line.")
        for line in path.read_text().splitlines():
            if line.strip():
                name = Path(line.split()[0]).stem
                if subset_of.setdefault(name, path.stem) != path.stem:
                    raise SegflowError(f"--subset-list: {name} is listed in both {subset_of[name]} and {path.stem}.")
    listed = [PairedItem(i.id, subset_of[i.image.stem], i.image, i.mask) for i in items if i.image.stem in subset_of]
    return listed, [str(i.image) for i in items if i.image.stem not in subset_of]


def paired_folders(images: Path, masks: Path, mask_suffix: str = "") -> list[PairedItem]:
    for what, folder in (("--images", images), ("--masks", masks)):
        if not Path(folder).is_dir():
            raise SegflowError(f"{what} {folder} is not a folder.")
    items = pair(Path(images), Path(masks), "", mask_suffix)
    if not items:
        raise SegflowError(f"--images {images}: the folder holds no images ({', '.join(IMAGE_SUFFIXES)}).")
    return items
