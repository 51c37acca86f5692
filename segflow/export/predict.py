"""Predict masks for a folder (or one file) of images with an IR or a PyTorch model folder.

    OUT/
      masks/<path>.png       label ids (uint8); <path> is the image's path below the input folder
      overlays/<path>.png    prediction colours over the image
      entropy/<path>.png     per-pixel normalised entropy, 0-255 (with --entropy)
      predictions.json       what was done, and which images were skipped and why

Output names keep the input folder's structure, with the extension replaced by ``.png``. Two
inputs that would get the same name (``a.png`` and ``a.jpg``) are refused before any work.

An IR runs through OpenVINO's asynchronous infer queue (several requests in flight). An
unreadable image is reported and skipped; the batch goes on.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import cv2
import numpy as np
import torch
import torch.nn.functional as F

from segflow.data import MAX_IMAGE_PIXELS
from segflow.data.datasets import (
    IMAGE_SUFFIXES,
    Normalization,
    image_files,
    read_rgb,
    to_tensor,
)
from segflow.data.transforms import resize_for_eval
from segflow.errors import SegflowError
from segflow.evaluate.pictures import overlay
from segflow.models import artifact as model_artifact
from segflow.models import outputs
from segflow.models.ir import IRSegmentor
from segflow.models.tiling import segment_image
from segflow.palette import palette
from segflow.progress import progress
from segflow.storage import InputFiles, is_s3


@dataclass(frozen=True)
class PredictConfig:
    model: str
    input: str
    out: str
    entropy: bool = False
    overwrite: bool = False
    ids: str = "train"  # train: the model's class indices; dataset: the training data's own label ids
    max_image_pixels: int = MAX_IMAGE_PIXELS  # larger images are refused unread (decompression bombs)


def input_files(source: str) -> InputFiles:
    """The images of ``--input``: a local folder or file, or an S3 prefix or object (each image
    downloaded only while it is predicted)."""
    if is_s3(source):
        return InputFiles.on_s3(source, IMAGE_SUFFIXES)
    path = Path(source).expanduser()
    if not path.exists():
        raise SegflowError(f"--input {path} does not exist: check the path.")
    return InputFiles.local(path, _inputs(path))


def _inputs(path: Path) -> list[Path]:
    if path.exists() and not path.is_dir() and not path.is_file():
        raise SegflowError(f"--input {path} is not a regular file or folder (a FIFO, socket or device).")
    if path.is_file():
        if path.suffix.lower() not in IMAGE_SUFFIXES:
            raise SegflowError(f"--input {path} is not an image file ({', '.join(sorted(IMAGE_SUFFIXES))}).")
        return [path]
    return image_files(path)


def model_input(image: np.ndarray, config: dict) -> torch.Tensor:
    """An RGB image as the model's 1 x 3 x H x W input: shorter side to the trained size, normalised."""
    norm = Normalization(**config["normalization"])
    return to_tensor(resize_for_eval(image, config["input_size"]), norm.mean, norm.std)[None]


def _write(
    stage: Path,
    stem: str,
    image: np.ndarray,
    mask: np.ndarray,
    entropy: np.ndarray | None,
    colours: np.ndarray,
    ids: np.ndarray,
) -> None:
    """Write one image's outputs. ``mask``: class indices (H x W uint8, overwritten with the
    written ids); ``image`` (RGB) is overwritten with the overlay in BGR: no full-size copies,
    which matters for large images. ``ids``: the value written for each class."""
    folders = ("masks", "overlays") + (("entropy",) if entropy is not None else ())
    for folder in folders:
        (stage / folder / stem).parent.mkdir(parents=True, exist_ok=True)
    if not image.flags.writeable:  # Pillow's arrays are read-only; large images come writable
        image = image.copy()
    wide = ids.max(initial=0) > 255  # dataset ids beyond 8 bits (e.g. 16-bit label maps)
    table = ids.astype(np.uint16 if wide else np.uint8)
    written = np.empty(mask.shape, np.uint16) if wide else mask
    grey = np.empty(mask.shape, np.uint8) if entropy is not None else None
    # In bands of about 1 MP: numpy's indexing and float maths (and OpenCV's colour conversion) make
    # full-size temporaries (int64 indices, float32 pixels) that would cost GBs on a 16k image.
    rows = max(1, 2**20 // mask.shape[1])
    for top in range(0, mask.shape[0], rows):
        band = slice(top, top + rows)
        image[band] = overlay(image[band], mask[band], colours)[..., ::-1]  # BGR, for OpenCV
        written[band] = table[mask[band]]
        if grey is not None:
            grey[band] = (255 * np.clip(entropy[band].astype(np.float32), 0, 1)).astype(np.uint8)
    _imwrite(stage / "masks" / f"{stem}.png", written)
    _imwrite(stage / "overlays" / f"{stem}.png", image)
    if grey is not None:
        _imwrite(stage / "entropy" / f"{stem}.png", grey)


def _imwrite(path: Path, array: np.ndarray) -> None:
    if not cv2.imwrite(str(path), array):
        raise SegflowError(f"{path}: cannot be written (is the disk full?).")


def output_names(files: InputFiles) -> list[str]:
    """A stable, unique output name per input (its relative path without the extension)."""
    names = [str(PurePosixPath(name).with_suffix("")) for name in files.names]
    by_name: dict[str, list[str]] = {}
    for name, original in zip(names, files.names, strict=True):
        by_name.setdefault(name, []).append(PurePosixPath(original).name)
    clashes = [f"{', '.join(paths)} -> {name}.png" for name, paths in by_name.items() if len(paths) > 1]
    if clashes:
        raise SegflowError(
            f"--input {files.source}: {len(clashes)} group(s) of images would get the same output name; rename them "
            "(or predict them separately):",
            problems=clashes,
        )
    return names


def probabilities(logits: np.ndarray | torch.Tensor, size: tuple[int, int]) -> np.ndarray:
    """Class probabilities (C x H x W) of one image's logits, resized to the image's size."""
    t = torch.as_tensor(logits)
    return outputs.probabilities(t[None] if t.ndim == 3 else t, size)[0].numpy()


def predict(cfg: PredictConfig, model_dir: Path, files: InputFiles, out_dir: Path) -> dict:
    """Masks (and overlays, entropy maps) of every image in ``files`` (:func:`input_files`), into ``out_dir``."""
    model, config = model_artifact.load(model_dir, "cpu")
    colours = palette(len(config["labels"]))
    if cfg.ids not in ("train", "dataset"):
        raise SegflowError(f"--ids must be train or dataset (got {cfg.ids!r}).")
    classes = list(range(len(config["labels"])))
    ids = np.asarray((config.get("dataset_ids") or classes) if cfg.ids == "dataset" else classes, dtype=np.int64)
    stems = output_names(files)
    skipped: list[dict] = []
    done = 0

    tiled = config.get("tiling") is not None

    def prepare(index: int):
        try:
            with files.read(index) as path:
                image = read_rgb(path, cfg.max_image_pixels)
        except SegflowError as exc:
            skipped.append({"image": files.location(index), "reason": str(exc).split(": ", 1)[-1]})
            return None, None
        return image, None if tiled else model_input(image, config)

    def write(stem: str, image: np.ndarray, probs: np.ndarray) -> None:
        mask = probs.argmax(0).astype(np.uint8)
        uncertainty = outputs.entropy_map(torch.from_numpy(probs)[None])[0].numpy() if cfg.entropy else None
        _write(out_dir, stem, image, mask, uncertainty, colours, ids)

    if tiled:  # tile by tile, in bounded memory, the same for an IR and a PyTorch model
        for index, stem in progress(enumerate(stems), len(stems), "predicting"):
            image, _ = prepare(index)
            if image is None:
                continue
            mask, uncertainty = segment_image(model, image, config, cfg.entropy)
            _write(out_dir, stem, image, mask, uncertainty, colours, ids)
            del image, mask, uncertainty
            done += 1
    elif isinstance(model, IRSegmentor):
        import openvino as ov

        queue = ov.AsyncInferQueue(model.compiled, 0)  # 0: as many requests as the device likes
        pending: dict[int, tuple[str, np.ndarray]] = {}

        def finished(request, job: int) -> None:
            stem, image = pending.pop(job)
            logits = request.get_output_tensor(0).data.copy()
            write(stem, image, probabilities(logits, image.shape[:2]))

        queue.set_callback(finished)
        for job, stem in progress(enumerate(stems), len(stems), "predicting"):
            image, x = prepare(job)
            if image is None:
                continue
            if model.static:
                x = F.interpolate(x, size=model.size, mode="bilinear", align_corners=False)
            pending[job] = (stem, image)
            queue.start_async({0: np.ascontiguousarray(x.numpy())}, job)
            done += 1
        queue.wait_all()
    else:
        with torch.no_grad():
            for index, stem in progress(enumerate(stems), len(stems), "predicting"):
                image, x = prepare(index)
                if image is None:
                    continue
                logits = model(x).logits.numpy()
                write(stem, image, probabilities(logits, image.shape[:2]))
                done += 1
    summary = {
        "metrics": {"predicted": done, "skipped": len(skipped)},
        "model": str(cfg.model),
        "input": str(cfg.input),
        "predicted": done,
        "skipped": skipped,
        "labels": config["labels"],
        "mask_values": {"ids": cfg.ids, "values": ids.tolist()},  # the value written for each label
        "runtime": "openvino" if isinstance(model, IRSegmentor) else "pytorch",
        "tiling": config.get("tiling"),
    }
    (out_dir / "predictions.json").write_text(json.dumps(summary, indent=2) + "\n")
    if done == 0:
        raise SegflowError(
            f"--input {cfg.input}: no image could be read; nothing was written.",
            problems=[f"{s['image']}: {s['reason']}" for s in skipped],
        )
    summary["output"] = str(cfg.out)
    return summary
