import pytest
import torch
from torch import nn

from sqakd.distill import FeatureAdapters


def test_one_conv1x1_with_bias_then_relu_per_tap():
    adapters = FeatureAdapters({"layer1.0": 4, "layer2": 6})
    features = {"layer1.0": torch.randn(2, 4, 5, 5), "layer2": torch.randn(2, 6, 3, 3)}
    adapted = adapters(features)
    assert set(adapted) == set(features)
    for tap, feature in features.items():
        block = adapters.adapters[tap.replace(".", "/")]
        conv = block[0]
        assert isinstance(conv, nn.Conv2d) and conv.kernel_size == (1, 1) and conv.bias is not None
        assert conv.in_channels == conv.out_channels == feature.shape[1]
        torch.testing.assert_close(adapted[tap], torch.relu(conv(feature)))
    assert set(adapters.state_dict()) == {
        "adapters.layer1/0.0.weight", "adapters.layer1/0.0.bias",
        "adapters.layer2.0.weight", "adapters.layer2.0.bias",
    }  # fmt: skip


def test_tapped_tensor_is_not_overwritten_and_gradients_reach_the_adapters():
    adapters = FeatureAdapters({"stage": 3})
    feature = torch.randn(1, 3, 4, 4)
    copy = feature.clone()
    adapters({"stage": feature})["stage"].sum().backward()
    assert torch.equal(feature, copy)
    assert all(p.grad is not None for p in adapters.parameters())


def test_unknown_tap_is_an_error():
    with pytest.raises(ValueError, match="adapters for"):
        FeatureAdapters({"a": 2})({"b": torch.randn(1, 2, 2, 2)})
