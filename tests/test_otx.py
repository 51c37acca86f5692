"""segflow's Lite-HRNet is the reference function: OTX weights converted give OTX's logits.

The fixtures (tests/fixtures/otx_reference/, made by make.py in OTX 2.6's own environment) hold
OTX's state-dict keys and its logits for seeded weights (tests/otx_weights.py). Point
SEGFLOW_OTX_REFERENCE at a folder of ``otx_<model>.safetensors`` + ``otx_<model>_io.safetensors``
(real OTX state dicts with their input and logits) to check those too.
"""

from __future__ import annotations

import base64
import json
import os
from pathlib import Path

import numpy as np
import otx_weights
import pytest
import torch
from conftest import run_cli
from safetensors.torch import load_file, save_file

from segflow.errors import SegflowError
from segflow.models import MODEL_NAMES, create_model
from segflow.models.artifact import with_backbone
from segflow.models.otx import convert_state_dict, detect_architecture, read_checkpoint

FIXTURES = Path(__file__).parent / "fixtures" / "otx_reference"


def fixture(name: str) -> tuple[dict[str, torch.Tensor], torch.Tensor, torch.Tensor]:
    """(OTX state dict, input, OTX's logits) of one model."""
    record = json.loads((FIXTURES / f"{name}.json").read_text())
    state = {k: torch.from_numpy(v) for k, v in otx_weights.state(record["keys"]).items()}
    raw = np.frombuffer(base64.b64decode(record["logits_float32_base64"]), dtype="<f4")
    logits = torch.from_numpy(raw.reshape(record["logits_shape"]).copy())
    return state, torch.from_numpy(otx_weights.image(record["input_size"])), logits


def head_logits(state: dict, x: torch.Tensor, name: str) -> torch.Tensor:
    """segflow's logits at the head's stride (before the resize to the input), as OTX's are."""
    model = create_model(name, 3)
    model.load_state_dict(convert_state_dict(state, name, 3))
    model.eval()
    with torch.no_grad():
        return model.head(model.aggregator(model.backbone(x)))


def assert_float32_close(ours: torch.Tensor, ref: torch.Tensor) -> None:
    assert ours.shape == ref.shape
    scale = ref.abs().max().item()
    # float32 rounding over ~100 layers: 1e-5 of the logits' range, far below the 79-118% relative
    # error of the variant this replaced.
    assert (ours - ref).abs().max().item() <= 1e-5 * max(scale, 1.0), (ours - ref).abs().max().item()


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_converted_otx_weights_give_otx_logits(name):
    state, x, ref = fixture(name)
    assert detect_architecture(state) == name
    assert_float32_close(head_logits(state, x, name), ref)


REFERENCE = os.environ.get("SEGFLOW_OTX_REFERENCE", "")


@pytest.mark.skipif(not REFERENCE, reason="SEGFLOW_OTX_REFERENCE is not set")
@pytest.mark.parametrize("name", MODEL_NAMES)
def test_real_otx_state_dicts_give_otx_logits(name):
    state = load_file(str(Path(REFERENCE) / f"otx_{name}.safetensors"))
    io = load_file(str(Path(REFERENCE) / f"otx_{name}_io.safetensors"))
    assert_float32_close(head_logits(state, io["input"], name), io["output"])


def test_reference_function_is_not_the_plain_hrnet_sum():
    """The test above can fail: without the doubled branch-0 term the logits move far away."""
    from segflow.models import lite_hrnet

    state, x, ref = fixture("lite_hrnet_s")
    plain = lite_hrnet.FuseLayer.forward

    def once(self, xs):  # every path summed once over the untouched inputs
        outs = []
        for i in range(len(xs)):
            y = xs[i]
            for j in range(len(xs)):
                if j != i:
                    y = self._add(i, j, y, xs[j])
            outs.append(torch.relu(y))
        return outs

    lite_hrnet.FuseLayer.forward = once
    try:
        ours = head_logits(state, x, "lite_hrnet_s")
    finally:
        lite_hrnet.FuseLayer.forward = plain
    assert (ours - ref).abs().max() > 0.1 * ref.abs().max()


def test_otx_lightning_checkpoint_converts_to_a_model_that_evaluates_and_exports(tmp_path, tiny):
    """A pickled OTX checkpoint (state_dict under model.*) -> model folder -> evaluate -> export."""
    state, _, _ = fixture("lite_hrnet_s")
    labels = json.loads((tiny["data"] / "manifest.json").read_text())["labels"]
    # a head for the dataset's classes, as a checkpoint fine-tuned on it would have
    state["decode_head.conv_seg.weight"] = torch.randn(len(labels), 60, 1, 1) * 0.1
    state["decode_head.conv_seg.bias"] = torch.zeros(len(labels))
    torch.save({"state_dict": {f"model.{k}": v for k, v in state.items()}, "epoch": 3}, tmp_path / "otx.ckpt")

    code, out, err = run_cli(
        "models", "convert", tmp_path / "otx.ckpt", "--out", tmp_path / "m", "--labels", ",".join(labels),
        "--input-size", "64",
    )  # fmt: skip
    assert code == 0, err
    assert "lite_hrnet_s model with 7 classes" in out
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    assert config["source"]["converted_from"] == "otx" and config["normalization"]["mean"][0] == 123.675

    code, out, err = run_cli(
        "evaluate", "--model", tmp_path / "m", "--data", tiny["data"], "--out", tmp_path / "e", "--no-track"
    )
    assert code == 0, err
    assert json.loads((tmp_path / "e" / "metrics.json").read_text())["images"] > 0
    code, out, err = run_cli(
        "export", "--model", tmp_path / "m", "--out", tmp_path / "ir", "--calibration", tiny["data"], "--no-track"
    )
    assert code == 0, err
    assert json.loads((tmp_path / "ir" / "export_report.json").read_text())["passed"]

    # the backbone alone, for --init-backbone
    code, out, err = run_cli("models", "convert", tmp_path / "otx.ckpt", "--out", tmp_path / "bb", "--backbone-only")
    assert code == 0, err
    with_backbone("lite_hrnet_s", 7, tmp_path / "bb")


def test_convert_refuses_unknown_missing_and_mismatched_weights(tmp_path):
    state, _, _ = fixture("lite_hrnet_s")
    with pytest.raises(SegflowError, match=r"not Lite-HRNet keys.*backbone\.extra\.weight"):
        convert_state_dict({**state, "backbone.extra.weight": torch.zeros(1)}, "lite_hrnet_s", 3)
    gone = dict(state)
    del gone["backbone.stage1.0.fuse_layers.2.0.0.0.weight"]
    with pytest.raises(SegflowError, match=r"lacks 1 weights.*fuse\.paths\.2\.0\.0\.0\.0\.weight"):
        convert_state_dict(gone, "lite_hrnet_s", 3)
    with pytest.raises(SegflowError, match="lacks"):  # another architecture's keys
        convert_state_dict(state, "lite_hrnet_18", 3)

    save_file(state, str(tmp_path / "w.safetensors"))
    code, _, err = run_cli("models", "convert", tmp_path / "w.safetensors", "--out", tmp_path / "m", "--labels", "a,b")
    assert code == 2 and "head predicts 3 classes but 2 labels" in err
    code, _, err = run_cli("models", "convert", tmp_path / "w.safetensors", "--out", tmp_path / "m")
    assert code == 2 and "name them with --labels" in err
    assert not (tmp_path / "m").exists()


def test_pickled_checkpoints_load_with_weights_only(tmp_path):
    import argparse

    # any object beside the tensors (OTX keeps hyper-parameters so): weights_only refuses to build it
    torch.save({"state_dict": {"backbone.x": torch.zeros(1)}, "extra": argparse.Namespace(a=1)}, tmp_path / "obj.pth")
    with pytest.raises(SegflowError, match="weights_only=True"):
        read_checkpoint(tmp_path / "obj.pth")
    torch.save({"module.model.backbone.x": torch.ones(2)}, tmp_path / "plain.pth")
    assert list(read_checkpoint(tmp_path / "plain.pth")) == ["backbone.x"]
    with pytest.raises(SegflowError, match="no such checkpoint"):
        read_checkpoint(tmp_path / "nope.pth")


def test_weights_of_the_earlier_function_are_refused(tiny, tmp_path):
    import shutil

    old = Path(shutil.copytree(tiny["model"], tmp_path / "old"))
    config = json.loads((old / "config.json").read_text())
    (old / "config.json").write_text(json.dumps({**config, "format": "segflow.model/1"}))
    code, _, err = run_cli("evaluate", "--model", old, "--data", tiny["data"], "--out", tmp_path / "e", "--no-track")
    assert code == 2 and "earlier segflow" in err and "Train or pretrain it again" in err
