"""In eval mode without autograd, a quantized layer multiplies by its deployed weight: the integer
codes dequantized as ONNX ``DequantizeLinear`` does, i.e. bit for bit the weight of the exported
graph (``QuantizedLayer.deployed_weight``); in training, or with autograd on, it runs the weight
quantizer's own forward. The deployed weight is cached and recomputed when the weight or the
quantizer changes."""

import pytest
import torch
from torch import nn

from sqakd.export.view import build_export_view
from sqakd.quant import QuantPolicy, calibrate, prepare, quantized_layers

#: methods whose weight grid is uniform (an integer form exists), and APoT (levels: the forward)
METHODS = ["ewgs", "ste", "pact", "lsq", "lsq+", "dorefa", "dsq", "minmax", "binary", "apot"]


def layered(method: str, bits: int) -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
        nn.Flatten(), nn.Linear(8 * 6 * 6, 4),
    )  # fmt: skip
    act_method = "lsq" if method == "binary" else method
    policy = QuantPolicy(
        method=method, act_method=act_method, weight_bits=1 if method == "binary" else bits,
        act_bits=bits, first_last="same",
    )  # fmt: skip
    prepared = prepare(model, policy)
    calibrate(prepared, [torch.randn(4, 3, 6, 6)])
    return prepared.eval()


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("method", METHODS)
def test_deployed_weight_is_the_exported_weight_bit_for_bit(method, bits):
    model = layered(method, bits)
    view, _ = build_export_view(model)
    twins = dict(view.named_modules())
    with torch.no_grad():
        for name, layer in quantized_layers(model):
            deployed = layer.quantized_weight()
            assert torch.equal(deployed, twins[name].weight())
            # the same levels as the method's own forward, up to the last float bit
            own = layer.weight_quantizer(layer.weight)
            torch.testing.assert_close(deployed, own, rtol=1e-6, atol=1e-6)
            assert not torch.equal(layer.weight, deployed)


def test_dorefa_deployed_weight_differs_from_its_formula_only_in_the_last_bit():
    """DoReFa's ``2 round(.) / n - 1`` and ``(2 code - n) * (1 / n)`` are the same level in
    exact arithmetic; in float32 they differ by up to one ulp of the largest level (the formula's
    ``- 1`` rounds at that scale), which is why inference uses the exported one."""
    layer = quantized_layers(layered("dorefa", 4))[1][1]
    with torch.no_grad():
        deployed, own = layer.quantized_weight(), layer.weight_quantizer(layer.weight)
    ulp = torch.finfo(torch.float32).eps * own.abs().max()
    assert torch.all((deployed - own).abs() <= ulp)
    assert bool((deployed != own).any())


def test_training_or_autograd_uses_the_quantizers_forward():
    layer = quantized_layers(layered("ewgs", 4))[1][1]
    with torch.enable_grad():
        assert layer.quantized_weight().requires_grad
    layer.train()
    with torch.no_grad():
        assert torch.equal(layer.quantized_weight(), layer.weight_quantizer(layer.weight))


def test_the_cache_follows_the_weight_and_the_quantizer():
    layer = quantized_layers(layered("ewgs", 4))[1][1]
    with torch.no_grad():
        first = layer.quantized_weight()
        assert layer.quantized_weight() is first  # cached
        layer.weight.mul_(1.5)  # in place: the version counter moves
        second = layer.quantized_weight()
        assert not torch.equal(second, first)
        layer.weight_quantizer.output_scale.data.fill_(2.0)  # through .data: no version bump
        third = layer.quantized_weight()
        assert not torch.equal(third, second)
        view, _ = build_export_view(nn.Sequential(layer))
        assert torch.equal(third, view[0].weight())
