"""Every model artifact segflow reads or writes, in one module.

    MODEL_DIR/     (segflow train)
      model.safetensors   state dict of the Segmentor (no pickle)
      config.json         architecture, labels, input size, normalisation, dataset fingerprint,
                          and a tiled model's tiling (segflow.models.tiling)
      training.json       how it was trained and the metrics that chose it
    BACKBONE_DIR/  (segflow pretrain)
      backbone.safetensors  config.json (format segflow.backbone/2)
    IR_DIR/        (segflow export)
      model.xml model.bin   the OpenVINO IR; its rt_info describes it too
      config.json           the model's config, precision
      export_report.json
    ENSEMBLE_DIR/  (segflow ensemble)
      member_<i>.safetensors  config.json (format segflow.ensemble/2: the members' configs)

Every ``config.json`` carries a format tag and the sha256 of the weight files beside it. Loading
checks both, so a truncated or damaged file is refused by name instead of failing deep inside
torch or OpenVINO.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from segflow.data import IGNORE_INDEX
from segflow.errors import SegflowError
from segflow.models import FUNCTION_VERSION, MODEL_NAMES, Segmentor, create_model
from segflow.models.tiling import config_problems
from segflow.storage import confined, read_json, sha256_file

# The version in each tag is the model family's FUNCTION_VERSION: weights are only meaningful
# with the function they were trained in.
MODEL_FORMAT = f"segflow.model/{FUNCTION_VERSION}"
BACKBONE_FORMAT = f"segflow.backbone/{FUNCTION_VERSION}"
ENSEMBLE_FORMAT = f"segflow.ensemble/{FUNCTION_VERSION}"
WEIGHTS = "model.safetensors"
BACKBONE_WEIGHTS = "backbone.safetensors"
CONFIG = "config.json"


def model_config(
    model: Segmentor,
    labels: list[str],
    input_size: int,
    normalization: dict,
    dataset_fingerprint: str = "",
    dataset_ids: list[int] | None = None,
    tiling: dict | None = None,
) -> dict:
    """``dataset_ids[t]``: what the training data called class ``t`` (the manifest's label_ids),
    so that predictions can be written in the dataset's own ids. ``tiling``: a tiled model's
    settings (``segflow.models.tiling``); absent for a model that resizes whole images."""
    return {
        **({"tiling": tiling} if tiling else {}),
        "dataset_ids": list(dataset_ids) if dataset_ids else list(range(len(labels))),
        "format": MODEL_FORMAT,
        "architecture": model.name,
        "num_classes": model.num_classes,
        "labels": labels,
        "input_size": input_size,
        "normalization": normalization,
        "ignore_index": IGNORE_INDEX,
        "aux": model.aux_head is not None,
        "dataset_fingerprint": dataset_fingerprint,
    }


# --- shared helpers -------------------------------------------------------------------------------


def save_weights(path: Path, state: dict[str, torch.Tensor], fmt: str) -> None:
    """A state dict as safetensors (contiguous CPU tensors), tagged with its format. Non-finite
    weights are never written: a model that holds them predicts garbage (or nothing) everywhere."""
    tensors, storages = {}, set()
    for key, value in state.items():
        tensor = value.detach().cpu().contiguous()
        # safetensors refuses tensors that share memory (tied weights, NNCF's shared quantisers):
        # each key gets its own copy, and load_state_dict fills every key again.
        storage = tensor.untyped_storage().data_ptr()
        tensors[key] = tensor.clone() if storage in storages else tensor
        storages.add(storage)
    check_finite(tensors, str(path))
    save_file(tensors, str(path), metadata={"format": fmt})


def check_finite(state: dict[str, torch.Tensor], where: str) -> None:
    """Refuse NaN or inf anywhere in ``state``. One float64 sum per tensor and one check of them
    all: a sum is finite exactly when every element is (float64 cannot overflow on float32
    weights), so only a failing state pays for finding the tensors by name."""
    floats = [v for v in state.values() if v.is_floating_point()]
    if not floats or torch.isfinite(torch.stack([v.sum(dtype=torch.float64) for v in floats])).all():
        return
    bad = [k for k, v in state.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        raise SegflowError(
            f"{where} holds non-finite values (NaN or inf) in {len(bad)} tensors, e.g. {bad[:3]}: training "
            "diverged. Train again, with a lower --lr."
        )


def check_model_config(config: dict, path: Path) -> dict:
    """The settings every reader of a model relies on (evaluate, predict, export, ensemble,
    adapt): one check, so that a crafted or damaged config.json is refused by name everywhere
    instead of mislabelling predictions or allocating gigabytes."""
    labels, classes, size = config.get("labels"), config.get("num_classes"), config.get("input_size")
    problems = []
    if not isinstance(labels, list) or not labels or not all(isinstance(x, str) for x in labels):
        problems.append(f"labels must be a list of class names (got {str(labels)[:80]})")
    elif len(labels) > IGNORE_INDEX:
        problems.append(f"{len(labels)} labels: at most {IGNORE_INDEX} classes fit a mask")
    elif not isinstance(classes, int) or isinstance(classes, bool) or classes != len(labels):
        problems.append(f"num_classes {classes!r} does not match the {len(labels)} labels")
    if isinstance(size, bool) or not isinstance(size, int) or not 32 <= size <= MAX_INPUT_SIZE or size % 32:
        problems.append(f"input_size must be a multiple of 32 between 32 and {MAX_INPUT_SIZE} (got {size!r})")
    ids = config.get("dataset_ids", list(range(len(labels) if isinstance(labels, list) else 0)))
    if not isinstance(ids, list) or len(ids) != len(labels if isinstance(labels, list) else []):
        problems.append("dataset_ids must give one dataset id per label")
    elif not all(isinstance(i, int) and not isinstance(i, bool) and 0 <= i <= 65535 for i in ids) or len(
        set(ids)
    ) < len(ids):
        problems.append("dataset_ids must be distinct whole numbers from 0 to 65535")
    norm = config.get("normalization")
    if not isinstance(norm, dict) or not all(_three_numbers(norm.get(k)) for k in ("mean", "std")):
        problems.append("normalization must hold mean and std, three finite numbers each")
    elif min(norm["std"]) <= 0:
        problems.append("normalization std must be positive")
    problems += config_problems(config.get("tiling"))
    if problems:
        raise SegflowError(f"{path} is not a valid model config: produce the model again.", problems=problems)
    return config


MAX_INPUT_SIZE = 8192


def _three_numbers(values) -> bool:
    return (
        isinstance(values, list)
        and len(values) == 3
        and all(isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v) for v in values)
    )


def _write_config(folder: Path, config: dict, weight_files: list[str]) -> None:
    config = {**config, "files": {name: sha256_file(folder / name) for name in weight_files}}
    (folder / CONFIG).write_text(json.dumps(config, indent=2) + "\n")


def read_config(folder: str | Path, fmt: str = MODEL_FORMAT) -> dict:
    """``config.json`` of an artifact of format ``fmt``, checked; its weight files verified."""
    folder = Path(folder)
    path = folder / CONFIG
    what = {
        MODEL_FORMAT: "model (from `segflow train`)",
        BACKBONE_FORMAT: "backbone (from `segflow pretrain`)",
        ENSEMBLE_FORMAT: "ensemble (from `segflow ensemble`)",
    }
    if not path.exists():
        raise SegflowError(f"{folder} is not a segflow {what.get(fmt, fmt)}: it has no {CONFIG}.")
    config = read_json(path)
    found = config.get("format") if isinstance(config, dict) else None
    if isinstance(found, str) and found != fmt and found.split("/")[0] == fmt.split("/")[0]:
        raise SegflowError(
            f"{path}: format {found!r} was written by an earlier segflow whose Lite-HRNet computed another "
            f"function than this one ({fmt!r}, the reference Lite-HRNet): its weights do not carry over. "
            "Train or pretrain it again (or convert an OTX checkpoint: segflow models convert)."
        )
    if not isinstance(config, dict) or found != fmt:
        raise SegflowError(f"{path}: format {found!r} is not {fmt!r}: pass a segflow {what.get(fmt, fmt)}.")
    if fmt != ENSEMBLE_FORMAT and config.get("architecture") not in MODEL_NAMES:
        raise SegflowError(f"{path}: architecture {config.get('architecture')!r} is not one of {MODEL_NAMES}.")
    if fmt == ENSEMBLE_FORMAT:
        members = config.get("members")
        if not isinstance(members, list) or len(members) < 2 or not all(isinstance(m, dict) for m in members):
            raise SegflowError(f"{path}: members must be a list of at least 2 model configs: produce it again.")
        for member in members:
            if member.get("architecture") not in MODEL_NAMES or not isinstance(member.get("weights"), str):
                raise SegflowError(f"{path}: a member names no known architecture or weights: produce it again.")
            check_model_config(member, path)
            confined(folder, member["weights"], f"member weights {member['weights']!r} in {path}", links=False)
    if fmt != BACKBONE_FORMAT:
        check_model_config(config, path)
    required = {MODEL_FORMAT: [WEIGHTS], BACKBONE_FORMAT: [BACKBONE_WEIGHTS]}.get(fmt)
    if fmt == ENSEMBLE_FORMAT:
        required = [m["weights"] for m in config["members"]]
    verify_files(folder, config, required or [])
    return config


def verify_files(folder: Path, config: dict, required: list[str]) -> None:
    """Every weight file the config lists exists and has its recorded sha256; the list must name
    at least the ``required`` files (a config without its list would let a changed file load),
    and every name stays inside ``folder``."""
    files = config.get("files")
    config_path = Path(folder) / CONFIG
    if not isinstance(files, dict) or not all(isinstance(v, str) for v in files.values()):
        raise SegflowError(
            f"{config_path} records no checksums of its files ('files'), so they cannot be verified: "
            "produce the artifact again."
        )
    missing = sorted(set(required) - set(files))
    if missing:
        raise SegflowError(f"{config_path} records no checksum of {missing}: produce the artifact again.")
    for name, expected in files.items():
        path = confined(folder, name, f"file name {name!r} in {config_path}")
        if not path.is_file():
            raise SegflowError(f"{path} is missing: the artifact is incomplete. Produce it again.")
        if sha256_file(path) != expected:
            raise SegflowError(
                f"{path} is damaged: its sha256 differs from the one recorded in {CONFIG} (truncated or changed "
                "after it was written). Produce the artifact again."
            )


def _load_weights(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise SegflowError(f"{path} is missing: the artifact is incomplete. Produce it again.")
    try:
        state = load_file(str(path))
    except Exception as exc:  # safetensors raises its own error type for truncated or foreign files
        raise SegflowError(f"{path} is not a readable safetensors file ({exc}): produce it again.") from None
    check_finite(state, str(path))
    return state


# --- model dir ------------------------------------------------------------------------------------


def save(folder: str | Path, model: Segmentor, config: dict) -> None:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    save_weights(folder / WEIGHTS, model.state_dict(), MODEL_FORMAT)
    _write_config(folder, config, [WEIGHTS])


def load(folder: str | Path, device: str | torch.device = "cpu"):
    """Rebuild the model from config.json and load its weights; the model is in eval mode.

    An OpenVINO IR folder (from `segflow export`) loads as an IRSegmentor with the same calling
    convention, so evaluation and prediction take either.
    """
    if is_ir(folder):
        return load_ir(folder)
    if _format(folder) == ENSEMBLE_FORMAT:
        return load_ensemble(folder, device)
    config = read_config(folder)
    return _build(config, Path(folder) / WEIGHTS).to(device).eval(), config


def create_from(folder: str | Path, aux: bool = False) -> Segmentor:
    """A model initialised from a model folder's weights (training mode). ``aux``: with an
    auxiliary head, which starts fresh when the folder's model has none."""
    config = read_config(folder)
    model = create_model(config["architecture"], config["num_classes"], aux=aux)
    state = _load_weights(Path(folder) / WEIGHTS)
    if not aux:
        state = {k: v for k, v in state.items() if not k.startswith("aux_")}
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.startswith("aux_")]
    if missing or unexpected:
        raise SegflowError(
            f"{folder}: weights do not fit {config['architecture']}: missing {missing[:3]}, "
            f"unexpected {unexpected[:3]}."
        )
    return model


def _build(config: dict, weights: Path) -> Segmentor:
    model = create_model(config["architecture"], config["num_classes"], aux=config.get("aux", False))
    state = _load_weights(weights)
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        raise SegflowError(f"{weights} does not fit {config['architecture']}: {str(exc)[:500]}") from None
    return model


def _format(folder: str | Path) -> str:
    try:
        return json.loads((Path(folder) / CONFIG).read_text()).get("format", "")
    except (OSError, ValueError, AttributeError, RecursionError):
        return ""  # read_config says what is wrong


# --- ensembles ------------------------------------------------------------------------------------


def save_ensemble(folder: str | Path, members: list[str | Path]) -> dict:
    """An ensemble of model folders (same labels): their weights and configs, in one artifact."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    if len(members) < 2:
        raise SegflowError("an ensemble needs at least 2 models (--models M1 M2 ...).")
    configs = [read_config(m) for m in members]
    labels = configs[0]["labels"]
    for member, config in zip(members, configs, strict=True):
        if config["labels"] != labels:
            raise SegflowError(f"{member} predicts {config['labels']}, the first model {labels}: members must agree.")
    for member in members:
        _load_weights(Path(member) / WEIGHTS)  # a diverged (NaN) member is refused by name
    names = []
    for i, member in enumerate(members):
        names.append(f"member_{i}.safetensors")
        (folder / names[-1]).write_bytes((Path(member) / WEIGHTS).read_bytes())
    config = {
        "format": ENSEMBLE_FORMAT,
        "architecture": "ensemble",
        "labels": labels,
        "num_classes": len(labels),
        "input_size": configs[0]["input_size"],
        "normalization": configs[0]["normalization"],
        "ignore_index": IGNORE_INDEX,
        "members": [{**c, "weights": n, "source": str(m)} for c, n, m in zip(configs, names, members, strict=True)],
        "dataset_fingerprint": configs[0].get("dataset_fingerprint", ""),
        "dataset_ids": configs[0].get("dataset_ids", list(range(len(labels)))),
    }
    _write_config(folder, config, names)
    return config


def load_ensemble(folder: str | Path, device: str | torch.device = "cpu"):
    from segflow.models.ensemble import Ensemble

    folder = Path(folder)
    config = read_config(folder, ENSEMBLE_FORMAT)
    mean, std = (torch.tensor(config["normalization"][k]) for k in ("mean", "std"))
    members, scales, shifts = [], [], []
    for member in config["members"]:
        members.append(_build(member, folder / member["weights"]))
        # The ensemble's input is normalised with its own statistics; each member wants its own.
        m_mean, m_std = (torch.tensor(member["normalization"][k]) for k in ("mean", "std"))
        scales.append((std / m_std).tolist())
        shifts.append(((mean - m_mean) / m_std).tolist())
    return Ensemble(members, scales, shifts).to(device).eval(), config


# --- backbone weights (DetCon pretraining) -------------------------------------------------------


def save_backbone(folder: str | Path, backbone: torch.nn.Module, config: dict) -> None:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    save_weights(folder / BACKBONE_WEIGHTS, backbone.state_dict(), BACKBONE_FORMAT)
    _write_config(folder, {**config, "format": BACKBONE_FORMAT}, [BACKBONE_WEIGHTS])


def with_backbone(name: str, num_classes: int, folder: str | Path | None) -> Segmentor:
    """A new model whose backbone starts from ``folder`` (from `segflow pretrain`), when given."""
    model = create_model(name, num_classes)
    if not folder:
        return model
    state = load_backbone(folder, name)
    try:
        missing, unexpected = model.backbone.load_state_dict(state, strict=False)
    except RuntimeError as exc:  # shapes differ
        raise SegflowError(f"{folder}: weights do not fit {name}: {str(exc)[:400]}") from None
    if missing or unexpected:
        raise SegflowError(
            f"{folder}: weights do not fit {name}: {len(missing)} missing keys (e.g. {missing[:3]}), "
            f"{len(unexpected)} unexpected (e.g. {unexpected[:3]})."
        )
    return model


def load_backbone(folder: str | Path, architecture: str) -> dict[str, torch.Tensor]:
    """Backbone weights for ``architecture``, checked: format tag, architecture, checksums."""
    folder = Path(folder)
    config = read_config(folder, BACKBONE_FORMAT)
    if config["architecture"] != architecture:
        raise SegflowError(
            f"{folder} holds a {config['architecture']!r} backbone but the model is {architecture!r}: "
            "pretrain the same architecture, or train that one."
        )
    return _load_weights(folder / BACKBONE_WEIGHTS)


# --- OpenVINO IR ----------------------------------------------------------------------------------


def is_ir(folder: str | Path) -> bool:
    from segflow.models.ir import IR_XML

    return (Path(folder) / IR_XML).exists()


def save_ir(folder: str | Path, ov_model, config: dict, precision: str) -> None:
    """The IR (FP16 weights only for ``precision="fp16"``), its metadata and checksums."""
    import openvino as ov

    from segflow.models.ir import IR_BIN, IR_FORMAT, IR_XML, write_metadata

    folder = Path(folder)
    write_metadata(ov_model, config, precision)
    ov.save_model(ov_model, str(folder / IR_XML), compress_to_fp16=precision == "fp16")
    ir_config = {k: v for k, v in config.items() if k != "files"}
    _write_config(folder, {**ir_config, "format": IR_FORMAT, "precision": precision}, [IR_XML, IR_BIN])


def load_ir(folder: str | Path, **kwargs):
    """An IR folder as an IRSegmentor (checksums verified when its config.json records them)."""
    from segflow.models.ir import IR_BIN, IR_XML, IRSegmentor

    folder = Path(folder)
    if not (folder / CONFIG).is_file():
        raise SegflowError(
            f"{folder} has no {CONFIG}, which records the checksums of {IR_XML} and {IR_BIN}: without it a "
            "changed IR cannot be told from the exported one. Export it again with `segflow export`."
        )
    config = read_json(folder / CONFIG)
    if not isinstance(config, dict):
        raise SegflowError(f"{folder / CONFIG} is not a mapping of settings: export the IR again.")
    verify_files(folder, config, [IR_XML, IR_BIN])
    ir = IRSegmentor(folder, **kwargs)
    check_model_config(ir.config, folder / IR_XML)
    return ir, ir.config
