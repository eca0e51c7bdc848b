"""The fused PACT and DoReFa activation kernels give exactly the values and gradients of the
papers' op-by-op definitions (the ones these files used before fusing), in either memory
layout, including elements below 0, exactly on the clip and above it."""

import pytest
import torch

from sqakd.quant import build_quantizer
from sqakd.quant.base import round_ste


def pact_reference(q, x: torch.Tensor) -> torch.Tensor:
    n = q.num_steps
    clipped = torch.where(x < q.alpha, x.clamp_min(0.0), q.alpha)
    quantized = torch.round(clipped * n / q.alpha) * q.alpha / n
    return quantized.detach() + (clipped - clipped.detach())


def dorefa_reference(q, x: torch.Tensor) -> torch.Tensor:
    return round_ste(torch.clamp(x, 0.0, 1.0) * q.num_steps) / q.num_steps


def outputs_and_grads(q, x, upstream, fn):
    x = x.detach().clone().requires_grad_()
    out = fn(q, x)
    params = [x, *q.parameters()]
    return [out.detach(), *torch.autograd.grad(out, params, upstream)]


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize(
    ("method", "reference"), [("pact", pact_reference), ("dorefa", dorefa_reference)]
)
@pytest.mark.parametrize("bits", [1, 2, 4, 8])
def test_fused_matches_the_op_by_op_definition(method, reference, bits, channels_last):
    torch.manual_seed(bits)
    x = torch.randn(6, 4, 5, 5) * 1.5
    x[0, 0, 0, :3] = torch.tensor([0.0, 1.0, -0.0])  # exactly on the bounds
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    q = build_quantizer(
        method, bits, "activation", **({"init_alpha": 1.0} if method == "pact" else {})
    )
    q.calibrate(x)
    upstream = torch.randn(x.shape)
    fused = outputs_and_grads(q, x, upstream, lambda module, inp: module(inp))
    expected = outputs_and_grads(q, x, upstream, reference)
    if method == "dorefa":
        assert torch.equal(fused[0], expected[0])
    else:  # n / alpha once instead of * n / alpha: at most one level apart on exact ties
        gap = (fused[0] - expected[0]).abs()
        assert float(gap.max()) <= float(q.alpha.detach()) / q.num_steps + 1e-6
        assert float((gap > 1e-6).float().mean()) < 0.01
    for got, want in zip(fused[1:], expected[1:]):
        assert got.shape == want.shape
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


def test_pact_gradients_by_hand():
    """alpha = 2, 2 bits (n = 3): x = [-1, 0.5, 1.9, 2, 3]; dx = [0, 1, 1, 0, 0] (clip at
    alpha included in the upper region); dalpha = g summed over x >= alpha = 4 + 5 with
    upstream g = [1, 2, 3, 4, 5]. Values: [0, round(0.75) 2/3, round(2.85) 2/3, 2, 2]."""
    q = build_quantizer("pact", 2, "activation", init_alpha=2.0)
    q.initialized.fill_(True)
    x = torch.tensor([-1.0, 0.5, 1.9, 2.0, 3.0], requires_grad=True)
    out = q(x)
    torch.testing.assert_close(out, torch.tensor([0.0, 2 / 3, 2.0, 2.0, 2.0]))
    out.backward(torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0]))
    assert x.grad.tolist() == [0.0, 2.0, 3.0, 0.0, 0.0]
    assert float(q.alpha.grad) == 9.0
