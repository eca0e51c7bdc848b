"""The fused LSQ forward/backward gives the values and gradients of the op-by-op definition
``round_ste(clamp((x - shift) / step, qmin, qmax)) * step + shift`` for LSQ, signed 1-bit LSQ and
LSQ+ (learned offset), per tensor and per channel, in either memory layout."""

import pytest
import torch

from sqakd.quant import build_quantizer
from sqakd.quant.base import broadcast_channels, round_ste


def reference(q, x: torch.Tensor) -> torch.Tensor:
    step, shift = q.step_and_shift(q.gradient_scale(x))
    step = broadcast_channels(step, x, q.channel_axis)
    shift = broadcast_channels(shift, x, q.channel_axis)
    qmin, qmax = q.code_range
    return round_ste(torch.clamp((x - shift) / step, qmin, qmax)) * step + shift


def outputs_and_grads(q, x, upstream, fn):
    x = x.detach().clone().requires_grad_()
    out = fn(q, x)
    params = [x, *q.parameters()]
    return [out.detach(), *torch.autograd.grad(out, params, upstream)]


@pytest.mark.parametrize(
    "method, role, bits, per_channel, channels_last",
    [("lsq", "activation", 4, False, False), ("lsq", "activation", 3, False, True),
     ("lsq", "weight", 4, False, False), ("lsq", "weight", 2, True, False),
     ("lsq", "weight", 1, False, False), ("lsq+", "activation", 4, False, False),
     ("lsq+", "weight", 3, True, False)],
)  # fmt: skip
def test_fused_matches_the_op_by_op_definition(method, role, bits, per_channel, channels_last):
    torch.manual_seed(0)
    x = torch.randn(6, 4, 5, 5)
    if role == "activation":
        x = torch.relu(x) - (0.2 if method == "lsq+" else 0.0)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    q = build_quantizer(method, bits, role, per_channel=per_channel)
    q.calibrate(x)
    upstream = torch.randn(x.shape)
    fused = outputs_and_grads(q, x, upstream, lambda module, inp: module(inp))
    expected = outputs_and_grads(q, x, upstream, reference)
    torch.testing.assert_close(fused[0], expected[0], rtol=0, atol=1e-6)
    for got, want in zip(fused[1:], expected[1:]):
        assert got.shape == want.shape
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_step_gradient_by_hand():
    """Qp = 7, Qn = 8, step 0.5: x = [0.3, 1.1, 5.0, -9.0] -> t = [0.6, 2.2, 10, -18]:
    dstep/g = [round(0.6) - 0.6, round(2.2) - 2.2, Qp, -Qn] = [0.4, -0.2, 7, -8], times the
    gradient scale 1 / sqrt(4 * 7); dx = [1, 1, 0, 0]."""
    q = build_quantizer("lsq", 4, "weight")
    q.step_size.data.fill_(0.5)
    q.initialized.fill_(True)
    x = torch.tensor([0.3, 1.1, 5.0, -9.0], requires_grad=True)
    q(x).sum().backward()
    torch.testing.assert_close(x.grad, torch.tensor([1.0, 1.0, 0.0, 0.0]))
    expected = (0.4 - 0.2 + 7 - 8) / (4 * 7) ** 0.5
    torch.testing.assert_close(q.step_size.grad, torch.tensor(expected))
