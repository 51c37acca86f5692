"""DetCon pseudo masks: Felzenszwalb superpixels of unlabelled images, as uint8 PNGs.

By default the masks go to a ``detcon_mask/`` folder beside the image folder (as in OTX), one
``<image stem>.png`` per image (255 = no region). Runs are idempotent: ``index.json`` there
records each image's sha256 and the Felzenszwalb parameters, and a mask is reused when both
match, so a second run over the same images costs one read per image.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from segflow.data import IGNORE_INDEX
from segflow.data.datasets import image_error, image_files
from segflow.errors import SegflowError
from segflow.parallel import map_all
from segflow.storage import sha256_file

MASK_DIR = "detcon_mask"
INDEX = "index.json"


@dataclass(frozen=True)
class FelzenszwalbParams:
    scale: float = 1000.0
    sigma: float = 0.8
    min_size: int = 1000

    def key(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)


def default_mask_dir(images: Path) -> Path:
    return images.absolute().parent / MASK_DIR


def segment(image: np.ndarray, params: FelzenszwalbParams) -> np.ndarray:
    """Region ids 0..254 by region size (largest first); regions beyond 255 become 255 (ignored)."""
    from skimage.segmentation import felzenszwalb

    labels = felzenszwalb(image, scale=params.scale, sigma=params.sigma, min_size=params.min_size)
    counts = np.bincount(labels.ravel())
    order = np.argsort(-counts, kind="stable")
    lut = np.full(len(counts), IGNORE_INDEX, dtype=np.uint8)
    keep = order[:IGNORE_INDEX]
    lut[keep] = np.arange(len(keep), dtype=np.uint8)
    return lut[labels]


def _work(job: tuple[str, str, FelzenszwalbParams]) -> tuple[str, str, str]:
    """(image, sha256 or "", error or "") for one image; writes its mask atomically."""
    image_path, mask_path, params = job
    try:
        raw = Path(image_path).read_bytes()
        digest = hashlib.sha256(raw).hexdigest()
        with Image.open(image_path) as img:
            rgb = np.asarray(img.convert("RGB"))
    except Exception as exc:
        return image_path, "", f"cannot read image: {image_error(exc)}"
    mask = segment(rgb, params)
    tmp = f"{mask_path}.tmp-{os.getpid()}.png"
    Image.fromarray(mask, mode="L").save(tmp)
    os.replace(tmp, mask_path)
    return image_path, digest, ""


def make_pseudo_masks(
    images: Path, out: Path | None = None, params: FelzenszwalbParams | None = None, workers: int = 0
) -> dict:
    """Create the missing or stale masks for every image in ``images``; return counts and paths."""
    params = params or FelzenszwalbParams()
    if params.scale <= 0 or params.sigma < 0 or params.min_size < 1:
        raise SegflowError("Felzenszwalb parameters: --scale must be > 0, --sigma >= 0, --min-size >= 1.")
    files = image_files(images)
    out = Path(out) if out else default_mask_dir(images)
    out.mkdir(parents=True, exist_ok=True)
    index_path = out / INDEX
    index = json.loads(index_path.read_text()) if index_path.exists() else {}
    names = [str(f.relative_to(images)) for f in files]
    stems = [rel.rsplit(".", 1)[0].replace("/", "__") for rel in names]
    if len(set(stems)) != len(stems):
        raise SegflowError(f"{images}: two images share a name (ignoring the extension); rename one.")

    todo, reused = [], 0
    for f, rel, stem in zip(files, names, stems, strict=True):
        mask = out / f"{stem}.png"
        entry = index.get(rel) or {}
        same_params = entry.get("params") == params.key() and entry.get("size") == f.stat().st_size
        if same_params and mask.exists() and entry["sha256"] == sha256_file(f):
            reused += 1
            continue
        todo.append((str(f), str(mask), params))

    failed: list[str] = []
    by_path = {str(f): (rel, f) for f, rel in zip(files, names, strict=True)}
    results = map_all(_work, todo, workers, "pseudo masks", ordered=False)
    for image_path, digest, error in results:
        rel, f = by_path[image_path]
        if error:
            failed.append(f"{image_path}: {error}")
            index.pop(rel, None)
        else:
            index[rel] = {"sha256": digest, "params": params.key(), "size": f.stat().st_size}
    # The index is written even when some images failed: the good masks are not made again.
    tmp = index_path.with_suffix(".tmp")
    tmp.write_text(json.dumps(dict(sorted(index.items())), indent=1))
    os.replace(tmp, index_path)
    if failed:
        raise SegflowError(f"{len(failed)} image(s) could not be read; their masks were not made:", problems=failed)
    return {"images": len(files), "made": len(todo), "reused": reused, "out": str(out)}


def mask_path_for(images: Path, image: Path, masks: Path) -> Path:
    rel = str(image.relative_to(images))
    return masks / f"{rel.rsplit('.', 1)[0].replace('/', '__')}.png"
