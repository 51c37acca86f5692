"""Bring OTX / mmsegmentation Lite-HRNet checkpoints into segflow.

OTX 2.x (OpenVINO Training Extensions) names its Lite-HRNet weights ``backbone.<...>`` and
``decode_head.<...>``; a Lightning checkpoint keeps them under ``state_dict`` with a ``model.``
prefix, and mmsegmentation 0.x checkpoints under ``state_dict`` without it. segflow's modules are
laid out the same way but named for what they do, so every key maps by a fixed rule (below).
Nothing is guessed: a key no rule knows, or a key the model needs that the checkpoint lacks, is
refused by name.

Checkpoints saved with torch's pickle format are read with ``weights_only=True`` only, so loading
one runs no code from it.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

import torch

from segflow.errors import SegflowError
from segflow.models import MODEL_NAMES, SPECS, create_model

# OTX's default Lite-HRNet normalisation (ImageNet statistics on a 0-255 scale).
OTX_NORMALIZATION = {"mean": [123.675, 116.28, 103.53], "std": [58.395, 57.12, 57.375]}

_CONV_MODULE = {"conv": "0", "bn": "1"}  # OTX's conv + norm module -> segflow's Sequential(conv, bn)
# A depthwise-separable step written flat by OTX (dw conv, bn, pw conv, bn[, relu]) -> segflow's
# Sequential(Sequential(dw, bn), Sequential(pw, bn[, relu])).
_FLAT_DW_PW = {"0": "0.0", "1": "0.1", "2": "1.0", "3": "1.1"}
_TENSOR = r"(weight|bias|running_mean|running_var|num_batches_tracked)"

# (OTX key pattern, segflow key from the match). Applied to keys without "model."/"module." prefixes.
_RULES: list[tuple[str, Callable[[re.Match], str]]] = [
    (
        rf"backbone\.stem\.(conv1|conv2)\.(conv|bn)\.{_TENSOR}",
        lambda m: f"backbone.stem.{m[1]}.{_CONV_MODULE[m[2]]}.{m[3]}",
    ),
    (
        rf"backbone\.stem\.branch1\.(\d)\.(conv|bn)\.{_TENSOR}",
        lambda m: f"backbone.stem.branch1.{m[1]}.{_CONV_MODULE[m[2]]}.{m[3]}",
    ),
    (
        rf"backbone\.stem\.(expand|depthwise|linear)_conv\.(conv|bn)\.{_TENSOR}",
        lambda m: f"backbone.stem.{m[1]}.{_CONV_MODULE[m[2]]}.{m[3]}",
    ),
    # A branch that changes width between stages: one flat depthwise-separable step.
    (
        rf"backbone\.transition(\d+)\.(\d+)\.([0-3])\.{_TENSOR}",
        lambda m: f"backbone.transitions.{m[1]}.layers.{m[2]}.{_FLAT_DW_PW[m[3]]}.{m[4]}",
    ),
    # A new, coarser branch: a sequence of stride-2 steps.
    (
        rf"backbone\.transition(\d+)\.(\d+)\.(\d+)\.([0-3])\.{_TENSOR}",
        lambda m: f"backbone.transitions.{m[1]}.layers.{m[2]}.{m[3]}.{_FLAT_DW_PW[m[4]]}.{m[5]}",
    ),
    (
        rf"backbone\.stage(\d+)\.(\d+)\.layers\.(\d+)\.cross_resolution_weighting\.(conv1|conv2)\.(conv|bn)\.{_TENSOR}",
        lambda m: (
            f"backbone.stages.{m[1]}.{m[2]}.blocks.{m[3]}.cross_resolution."
            f"{'reduce' if m[4] == 'conv1' else 'expand'}.{_CONV_MODULE[m[5]]}.{m[6]}"
        ),
    ),
    (
        rf"backbone\.stage(\d+)\.(\d+)\.layers\.(\d+)\.depthwise_convs\.(\d+)\.(conv|bn)\.{_TENSOR}",
        lambda m: f"backbone.stages.{m[1]}.{m[2]}.blocks.{m[3]}.depthwise.{m[4]}.{_CONV_MODULE[m[5]]}.{m[6]}",
    ),
    (  # SE-style gate: pool, conv1, ReLU, conv2, sigmoid -> gate.1 and gate.3
        r"backbone\.stage(\d+)\.(\d+)\.layers\.(\d+)\.spatial_weighting\.(\d+)\.(conv1|conv2)\.conv\.(weight|bias)",
        lambda m: (
            f"backbone.stages.{m[1]}.{m[2]}.blocks.{m[3]}.spatial.{m[4]}.gate.{'1' if m[5] == 'conv1' else '3'}.{m[6]}"
        ),
    ),
    # Fuse from a coarser branch: 1x1 conv + bn, the same layout in both.
    (
        rf"backbone\.stage(\d+)\.(\d+)\.fuse_layers\.(\d+)\.(\d+)\.([01])\.{_TENSOR}",
        lambda m: f"backbone.stages.{m[1]}.{m[2]}.fuse.paths.{m[3]}.{m[4]}.{m[5]}.{m[6]}",
    ),
    # Fuse from a finer branch: stride-2 steps.
    (
        rf"backbone\.stage(\d+)\.(\d+)\.fuse_layers\.(\d+)\.(\d+)\.(\d+)\.([0-3])\.{_TENSOR}",
        lambda m: f"backbone.stages.{m[1]}.{m[2]}.fuse.paths.{m[3]}.{m[4]}.{m[5]}.{_FLAT_DW_PW[m[6]]}.{m[7]}",
    ),
    (
        rf"decode_head\.aggregator\.projects\.(\d+)\.(depthwise|pointwise)_conv\.(conv|bn)\.{_TENSOR}",
        lambda m: f"aggregator.projects.{m[1]}.{'0' if m[2] == 'depthwise' else '1'}.{_CONV_MODULE[m[3]]}.{m[4]}",
    ),
    (
        rf"decode_head\.aggregator\.expanders\.(\d+)\.(conv|bn)\.{_TENSOR}",
        lambda m: f"aggregator.expanders.{m[1]}.{_CONV_MODULE[m[2]]}.{m[3]}",
    ),
    (rf"decode_head\.convs\.0\.(conv|bn)\.{_TENSOR}", lambda m: f"head.conv.{_CONV_MODULE[m[1]]}.{m[2]}"),
    (r"decode_head\.conv_seg\.(weight|bias)", lambda m: f"head.classifier.{m[1]}"),
]
_COMPILED = [(re.compile(pattern), to) for pattern, to in _RULES]


def segflow_key(otx_key: str) -> str | None:
    """The segflow name of an OTX Lite-HRNet key, or None when no rule knows it."""
    for pattern, to in _COMPILED:
        match = pattern.fullmatch(otx_key)
        if match:
            return to(match)
    return None


def read_checkpoint(path: str | Path) -> dict[str, torch.Tensor]:
    """The tensors of a checkpoint: safetensors, or a torch file read with ``weights_only=True``.

    Accepts a bare state dict or a dict with ``state_dict`` (Lightning, mmengine); strips the
    ``model.`` (OTX's Lightning module) and ``module.`` (DDP) prefixes.
    """
    path = Path(path)
    if not path.is_file():
        raise SegflowError(f"{path}: no such checkpoint file.")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            state = load_file(str(path))
        except Exception as exc:  # safetensors has its own error type for damaged files
            raise SegflowError(f"{path} is not a readable safetensors file ({exc}).") from None
    else:
        if Path(path).stat().st_size == 0:
            raise SegflowError(f"{path} is empty (0 bytes): it is not a checkpoint. Copy the checkpoint again.")
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # pickle refuses objects beyond tensors and plain containers
            reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
            raise SegflowError(
                f"{path} cannot be read with weights_only=True ({reason}). segflow reads "
                "only tensors from pickled checkpoints: in the environment that wrote it (where its code is "
                "trusted), save the weights alone with safetensors, e.g. "
                "`safetensors.torch.save_file(model.state_dict(), 'weights.safetensors')`, and convert that file."
            ) from None
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not state:
        raise SegflowError(f"{path} holds no state dict (a mapping of names to tensors).")
    tensors = {}
    for key, value in state.items():
        if not isinstance(value, torch.Tensor):
            raise SegflowError(f"{path}: entry {key!r} is not a tensor; pass a checkpoint of weights.")
        for prefix in ("module.", "model."):
            key = key.removeprefix(prefix)
        tensors[key] = value
    return tensors


def detect_architecture(state: dict[str, torch.Tensor]) -> str:
    """lite_hrnet_s / 18 / x from the number of stages and the stem width."""
    stages = {int(m[1]) for k in state if (m := re.match(r"backbone\.stage(\d+)\.", k))}
    stem = state.get("backbone.stem.conv1.conv.weight")
    for name in MODEL_NAMES:
        spec = SPECS[name]
        if len(stages) == len(spec.channels) and stem is not None and stem.shape[0] == spec.stem.channels:
            return name
    raise SegflowError(
        f"the checkpoint's backbone ({len(stages)} stages, stem width "
        f"{None if stem is None else stem.shape[0]}) is none of {', '.join(MODEL_NAMES)}: pass --model."
    )


def convert_state_dict(
    otx_state: dict[str, torch.Tensor], architecture: str, num_classes: int, backbone_only: bool = False
) -> dict[str, torch.Tensor]:
    """OTX keys -> segflow keys for ``architecture``, checked against the model's own: every key
    known, none missing, every shape equal. ``backbone_only``: the backbone's weights alone (the
    head's keys may be present; they are checked and dropped)."""
    unknown = [k for k in otx_state if segflow_key(k) is None]
    if unknown:
        raise SegflowError(
            f"{len(unknown)} checkpoint keys are not Lite-HRNet keys segflow knows, e.g. {unknown[:5]}: "
            "pass an OTX / mmsegmentation Lite-HRNet checkpoint (backbone.* and decode_head.* weights)."
        )
    state = {segflow_key(k): v for k, v in otx_state.items()}
    model = create_model(architecture, num_classes)
    expected = model.backbone.state_dict() if backbone_only else model.state_dict()
    if backbone_only:
        state = {k.removeprefix("backbone."): v for k, v in state.items() if k.startswith("backbone.")}
    elif "head.classifier.weight" in state and state["head.classifier.weight"].shape[0] != num_classes:
        found = state["head.classifier.weight"].shape[0]
        raise SegflowError(
            f"the checkpoint's head predicts {found} classes but {num_classes} labels were given: pass the "
            f"{found} labels it was trained with (--labels), or convert the backbone alone (--backbone-only)."
        )
    missing = [k for k in expected if k not in state]
    if missing:
        raise SegflowError(
            f"the checkpoint lacks {len(missing)} weights of {architecture}, e.g. {missing[:5]}: it is another "
            "architecture (pass --model) or incomplete. Use --backbone-only for backbone weights alone."
        )
    extra = [k for k in state if k not in expected]
    if extra:
        raise SegflowError(f"the checkpoint has {len(extra)} weights {architecture} lacks, e.g. {extra[:5]}.")
    wrong = [
        f"{k} {tuple(state[k].shape)} != {tuple(v.shape)}" for k, v in expected.items() if state[k].shape != v.shape
    ]
    if wrong:
        raise SegflowError(f"the checkpoint's shapes do not fit {architecture}: {wrong[:3]}.")
    return {k: state[k].to(expected[k].dtype) for k in expected}


def convert_checkpoint(
    checkpoint: str | Path,
    out_dir: str | Path,
    labels: list[str],
    architecture: str = "",
    backbone_only: bool = False,
    input_size: int = 512,
) -> dict:
    """An OTX / mmseg Lite-HRNet checkpoint as a segflow model folder (``segflow train``'s
    layout: evaluate, export and adapt take it) or, with ``backbone_only``, as backbone weights
    for ``segflow train --init-backbone``. Returns the artifact's config."""
    from segflow.models import artifact, check_input_size, check_name
    from segflow.storage import sha256_file

    otx_state = read_checkpoint(checkpoint)
    architecture = check_name(architecture) if architecture else detect_architecture(otx_state)
    check_input_size(input_size)
    head = otx_state.get("decode_head.conv_seg.weight")
    if not backbone_only:
        if head is None:
            raise SegflowError(
                f"{checkpoint} has no segmentation head (decode_head.*): convert it with --backbone-only."
            )
        if not labels:
            raise SegflowError(f"{checkpoint}: its head predicts {head.shape[0]} classes: name them with --labels.")
        if len(set(labels)) != len(labels):
            raise SegflowError(f"--labels {labels}: every label must be named once.")
    num_classes = len(labels) if labels else int(head.shape[0]) if head is not None else 2
    state = convert_state_dict(otx_state, architecture, num_classes, backbone_only)
    source = {"checkpoint": str(checkpoint), "sha256": sha256_file(Path(checkpoint)), "converted_from": "otx"}
    model = create_model(architecture, num_classes)
    if backbone_only:
        model.backbone.load_state_dict(state)
        config = {"architecture": architecture, "normalization": OTX_NORMALIZATION, "source": source}
        artifact.save_backbone(out_dir, model.backbone, config)
        return {**config, "format": artifact.BACKBONE_FORMAT}
    model.load_state_dict(state)
    config = {**artifact.model_config(model, labels, input_size, OTX_NORMALIZATION), "source": source}
    artifact.save(out_dir, model, config)
    return config
