"""The model artifact: a folder with safetensors weights (no pickle) and a config.json.

MODEL_DIR/
  model.safetensors   state dict of the Segmentor
  config.json         architecture, labels, input size, normalisation, dataset fingerprint
  training.json       how it was trained and the metrics that chose it (written by train)
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from segflow.data import IGNORE_INDEX
from segflow.errors import SegflowError
from segflow.models import MODEL_NAMES, Segmentor, create_model

FORMAT = "segflow.model/1"
WEIGHTS = "model.safetensors"
CONFIG = "config.json"


def model_config(
    model: Segmentor, labels: list[str], input_size: int, normalization: dict, dataset_fingerprint: str = ""
) -> dict:
    return {
        "format": FORMAT,
        "architecture": model.name,
        "num_classes": model.num_classes,
        "labels": labels,
        "input_size": input_size,
        "normalization": normalization,
        "ignore_index": IGNORE_INDEX,
        "aux": model.aux_head is not None,
        "dataset_fingerprint": dataset_fingerprint,
    }


def save(folder: str | Path, model: Segmentor, config: dict) -> None:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(folder / WEIGHTS), metadata={"format": FORMAT})
    (folder / CONFIG).write_text(json.dumps(config, indent=2) + "\n")


def read_config(folder: str | Path) -> dict:
    path = Path(folder) / CONFIG
    if not path.exists():
        raise SegflowError(f"{folder} is not a segflow model (no {CONFIG}): pass a folder written by `segflow train`.")
    try:
        config = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise SegflowError(f"{path} is not valid JSON ({exc}).") from None
    if config.get("format") != FORMAT or config.get("architecture") not in MODEL_NAMES:
        raise SegflowError(f"{path}: not a {FORMAT} config with a known architecture.")
    return config


def load(folder: str | Path, device: str | torch.device = "cpu") -> tuple[Segmentor, dict]:
    """Rebuild the model from config.json and load its weights; the model is in eval mode.

    An OpenVINO IR folder (from `segflow export`) loads as an IRSegmentor with the same calling
    convention, so evaluation and prediction take either.
    """
    from segflow.export.runtime import IRSegmentor, is_ir

    if is_ir(folder):
        ir = IRSegmentor(folder)
        return ir, ir.config
    config = read_config(folder)
    weights = Path(folder) / WEIGHTS
    if not weights.exists():
        raise SegflowError(f"{folder} has no {WEIGHTS}.")
    model = create_model(config["architecture"], config["num_classes"], aux=config.get("aux", False))
    try:
        model.load_state_dict(load_file(str(weights), device=str(device)))
    except RuntimeError as exc:
        raise SegflowError(f"{weights} does not fit {config['architecture']}: {str(exc)[:500]}") from None
    return model.to(device).eval(), config
