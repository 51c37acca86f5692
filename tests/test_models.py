"""Model family: sizes match the reference, outputs have the right shapes, names are checked."""

import pytest
import torch

from segflow.errors import SegflowError
from segflow.models import MODEL_NAMES, PUBLISHED, count_parameters, create_model


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_parameter_count_equals_the_published_one(name):
    assert count_parameters(create_model(name, num_classes=3)) == PUBLISHED[name]["params"]


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_outputs_at_input_size_with_aux_and_features(name):
    model = create_model(name, num_classes=5, aux=True).eval()
    with torch.no_grad():
        out = model(torch.randn(2, 3, 64, 48), with_aux=True, with_features=True)
    assert out.logits.shape == (2, 5, 64, 48)
    assert out.aux_logits.shape == (2, 5, 64, 48)
    assert out.features.shape[:2] == (2, model.spec.head_channels)


def test_aux_output_needs_the_aux_head():
    assert count_parameters(create_model("lite_hrnet_s", 3, aux=True)) > count_parameters(
        create_model("lite_hrnet_s", 3)
    )
    with pytest.raises(SegflowError, match="aux=True"):
        create_model("lite_hrnet_s", 3).eval()(torch.zeros(1, 3, 32, 32), with_aux=True)


def test_unknown_name_and_too_few_classes():
    with pytest.raises(SegflowError, match="lite_hrnet_s"):
        create_model("resnet_50", 3)
    with pytest.raises(SegflowError, match="at least 2"):
        create_model("lite_hrnet_s", 1)


def test_gradients_reach_the_stem():
    model = create_model("lite_hrnet_s", 3)
    model(torch.randn(2, 3, 32, 32)).logits.sum().backward()
    assert model.backbone.stem.conv1[0].weight.grad.abs().sum() > 0


def test_interleave_is_the_channel_shuffle_of_the_concatenation():
    from segflow.models.lite_hrnet import interleave

    a, b = torch.randn(2, 3, 4, 5), torch.randn(2, 3, 4, 5)
    shuffled = torch.cat([a, b], dim=1).view(2, 2, 3, 4, 5).transpose(1, 2).reshape(2, 6, 4, 5)
    assert torch.equal(interleave(a, b), shuffled)


def test_weights_that_share_memory_are_saved_and_read_back(tmp_path):
    """Tied tensors (NNCF's shared quantisers in QAT) are stored as one copy per key."""
    from safetensors.torch import load_file

    from segflow.models.artifact import save_weights

    shared = torch.arange(6.0)
    state = {"a": shared, "b": shared, "c": shared[:3]}
    save_weights(tmp_path / "w.safetensors", state, "test/1")
    back = load_file(str(tmp_path / "w.safetensors"))
    assert set(back) == {"a", "b", "c"} and torch.equal(back["b"], shared) and torch.equal(back["c"], shared[:3])
