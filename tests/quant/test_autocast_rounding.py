"""Under ``torch.autocast`` (``run.precision: bf16``) every quantizer still rounds in float32:
its output, and its gradients, are bit-identical to a float32 run on the same input, also when
that input arrives in bfloat16 (the output of a bfloat16 convolution)."""

from __future__ import annotations

import pytest
import torch

from sqakd.quant import available_quantizers, build_quantizer


def quantizer_pair(name: str, bits: int, role: str):
    """Two identical, initialised quantizers (one for each precision), or a skip."""
    try:
        first = build_quantizer(name, bits, role)
    except ValueError as error:  # a method with fixed bits (binary, ternary)
        pytest.skip(str(error))
    torch.manual_seed(0)
    sample = torch.randn(64, 16, 6, 6) if role == "activation" else torch.randn(16, 8, 3, 3)
    if role == "activation":
        sample = sample.relu()
    first.calibrate(sample)
    second = build_quantizer(name, bits, role)
    second.load_state_dict(first.state_dict())
    return first.train(), second.train(), sample


def forward_and_grads(quantizer, x: torch.Tensor, autocast: bool):
    x = x.detach().clone().requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        out = quantizer(x)
    out.backward(torch.linspace(-1, 1, out.numel()).reshape(out.shape))
    grads = [x.grad] + [p.grad for p in quantizer.parameters()]
    return out.detach(), grads


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("role", ["weight", "activation"])
@pytest.mark.parametrize("name", available_quantizers())
def test_a_quantizer_under_bf16_autocast_computes_exactly_what_float32_does(name, role, bits):
    in_float, in_autocast, sample = quantizer_pair(name, bits, role)
    for x in (sample, sample.bfloat16()):  # a float32 input, and a bfloat16 one
        expected, expected_grads = forward_and_grads(in_float, x.float(), autocast=False)
        out, grads = forward_and_grads(in_autocast, x, autocast=True)
        assert out.dtype == torch.float32
        torch.testing.assert_close(out, expected, rtol=0, atol=0)
        for got, want in zip(grads, expected_grads):
            if want is not None:  # a bfloat16 input gets its gradient cast back to bfloat16
                torch.testing.assert_close(got, want.to(got.dtype), rtol=0, atol=0)
        in_float.zero_grad(), in_autocast.zero_grad()


def test_rounding_in_bfloat16_would_move_values_to_other_grid_points():
    """Why the quantizers upcast: the same EWGS activation quantizer fed the same bfloat16
    values, with its arithmetic left in bfloat16, picks other grid points for some of them."""
    quantizer, _, sample = quantizer_pair("ewgs", 8, "activation")
    values = sample.bfloat16()
    with torch.no_grad():
        in_float32 = quantizer(values.float())
        in_bfloat16 = quantizer.quantize(values).float()  # the arithmetic in the input's type
    step = float((quantizer.upper - quantizer.lower) / quantizer.num_steps)
    moved = (in_bfloat16 - in_float32).abs() > 0.5 / quantizer.num_steps
    assert step > 0 and moved.any()
