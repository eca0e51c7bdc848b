"""The fused DSQ kernel (eager, and compiled with ``run.compile: true``) gives the hard values
and the soft staircase's gradients of the op-by-op definition ``hard + Q_S - Q_S.detach()``, for
both roles, per tensor and per channel, in either memory layout, with elements clipped on both
sides and on the bounds themselves."""

import math
import shutil

import pytest
import torch

from sqakd.quant import kernels, set_compiled_kernels
from sqakd.quant.methods.dsq import DSQQuantizer


def reference(q: DSQQuantizer, x: torch.Tensor) -> torch.Tensor:
    """DSQ written out op by op: the hard value forward, the soft staircase's gradient backward."""
    soft = q.soft_quantize(x)
    lower, upper, delta = q._range(x)
    clipped = torch.clamp(x, min=lower, max=upper)
    hard = (torch.round((clipped - lower) / delta) * delta + lower).detach()
    return hard + soft - soft.detach()


def outputs_and_grads(q: DSQQuantizer, x: torch.Tensor, upstream: torch.Tensor, fn):
    x = x.detach().clone().requires_grad_()
    out = fn(q, x)
    return [out.detach(), *torch.autograd.grad(out, [x, q.lower, q.upper, q.alpha], upstream)]


def case(role: str, per_channel: bool, channels_last: bool) -> tuple[DSQQuantizer, torch.Tensor]:
    """A calibrated 3-bit quantizer whose range is narrowed so that elements clip on both sides,
    and an input with elements exactly on ``l`` and on ``u`` (in each channel)."""
    torch.manual_seed(0)
    x = torch.randn(6, 4, 5, 5)
    if role == "activation":
        x = torch.relu(x) - 0.1
    q = DSQQuantizer(3, role, per_channel=per_channel, init_alpha=0.3)
    q.calibrate(x)
    with torch.no_grad():
        q.lower.mul_(0.8)
        q.upper.mul_(0.7)
        bounds = x.view(x.shape[0], -1) if per_channel else x.view(1, -1)
        bounds[:, 0], bounds[:, 1] = q.lower, q.upper
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    return q, x


CASES = [("activation", False, False), ("activation", False, True), ("weight", False, False),
         ("weight", True, False)]  # fmt: skip


def assert_same(got: list[torch.Tensor], want: list[torch.Tensor]) -> None:
    torch.testing.assert_close(got[0], want[0], rtol=0, atol=1e-6)
    for name, a, b in zip(("x", "lower", "upper", "alpha"), got[1:], want[1:]):
        assert a.shape == b.shape, name
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4, msg=name)


@pytest.mark.parametrize("role, per_channel, channels_last", CASES)
def test_fused_matches_the_op_by_op_definition(role, per_channel, channels_last):
    q, x = case(role, per_channel, channels_last)
    upstream = torch.randn(x.shape)
    fused = outputs_and_grads(q, x, upstream, lambda module, inp: module(inp))
    assert_same(fused, outputs_and_grads(q, x, upstream, reference))
    assert float(fused[2].abs().min()) > 0 and float(fused[3].abs().min()) > 0


@pytest.mark.parametrize("per_channel", [False, True])
def test_fused_matches_when_the_width_is_clamped(per_channel):
    """u - l below the minimum width: Delta stops depending on l and u, the elements above u sit
    mid-interval and the range gradients no longer cancel into g."""
    q, x = case("weight", per_channel, False)
    with torch.no_grad():  # t = (u - l) / Delta = 3.5 above u: mid-interval, not at its end
        narrow = ... if not per_channel else slice(0, 2)
        q.lower[narrow], q.upper[narrow] = 0.0, 5e-9
        x.view(-1)[:7] = torch.linspace(-1e-9, 6e-9, 7)
    upstream = torch.randn(x.shape)
    fused = outputs_and_grads(q, x, upstream, lambda module, inp: module(inp))
    assert_same(fused, outputs_and_grads(q, x, upstream, reference))


def test_hand_worked_range_gradients():
    """l = 0, u = 3, 2 bits (Delta = 1), alpha = 0.2: kappa = ln 9, s = 1 / tanh(kappa / 2) =
    1.25. x = 1.5 sits on a midpoint (r = 0, phi = 0, phi' / 2 = s kappa / 2 = 0.625 kappa):
    dx = 0.625 kappa; at fixed Delta dQ/dl = 1 - 0.625 kappa and dQ/dDelta = i + 1/2 + phi / 2 -
    (phi' / 2) t = 1.5 - 0.9375 kappa, Delta = (u - l) / 3 gives du = (1.5 - 0.9375 kappa) / 3 and
    dl = 0.5 - 0.3125 kappa. x = 4.0 is clipped to u: its g = 2 goes to u alone. At r = 0 phi
    does not depend on kappa: no alpha gradient."""
    q = DSQQuantizer(2, "activation")
    q.lower.data.fill_(0.0)
    q.upper.data.fill_(3.0)
    q.alpha.data.fill_(0.2)
    q.initialized.fill_(True)
    x = torch.tensor([1.5, 4.0], requires_grad=True)
    q(x).backward(torch.tensor([1.0, 2.0]))
    kappa = math.log(9.0)
    torch.testing.assert_close(x.grad, torch.tensor([0.625 * kappa, 0.0]))
    assert float(q.upper.grad) == pytest.approx(2.0 + (1.5 - 0.9375 * kappa) / 3, rel=1e-5)
    assert float(q.lower.grad) == pytest.approx(0.5 - 0.3125 * kappa, rel=1e-5)
    assert float(q.alpha.grad) == pytest.approx(0.0, abs=1e-6)


@pytest.mark.slow
@pytest.mark.skipif(not (shutil.which("g++") or shutil.which("c++")), reason="no C++ compiler")
@pytest.mark.parametrize("role, per_channel, channels_last", CASES)
def test_compiled_matches_the_op_by_op_definition(role, per_channel, channels_last):
    q, x = case(role, per_channel, channels_last)
    upstream = torch.randn(x.shape)
    set_compiled_kernels(q, True)
    compiled = outputs_and_grads(q, x, upstream, lambda module, inp: module(inp))
    assert "dsq" not in kernels.failed_kernels(), "torch.compile failed; fell back to eager"
    assert_same(compiled, outputs_and_grads(q, x, upstream, reference))


@pytest.mark.parametrize("alpha", [0.6, 0.5, 1e-4, 1e-5])
def test_fused_matches_at_and_beyond_the_alpha_clamp(alpha):
    """alpha is clamped into [1e-4, 0.5]: beyond a bound its gradient is 0, on a bound it passes
    (as torch.clamp's does), and l, u, x see the clamped value."""
    q, x = case("activation", False, False)
    q.alpha.data.fill_(alpha)
    upstream = torch.randn(x.shape)
    fused = outputs_and_grads(q, x, upstream, lambda module, inp: module(inp))
    assert_same(fused, outputs_and_grads(q, x, upstream, reference))
    assert (float(fused[4]) == 0.0) == (alpha > 0.5 or alpha < 1e-4)


def test_float_and_tensor_epilogues_agree(monkeypatch):
    """A per-tensor range on the CPU runs the gradient epilogue on Python floats; forcing the
    tensor epilogue (what per-channel ranges and GPU tensors use) gives the same gradients."""
    q, x = case("weight", False, False)
    upstream = torch.randn(x.shape)
    on_floats = outputs_and_grads(q, x, upstream, lambda module, inp: module(inp))
    monkeypatch.setattr(kernels, "_numbers", lambda *values: (list(values), kernels._TensorMath))
    on_tensors = outputs_and_grads(q, x, upstream, lambda module, inp: module(inp))
    assert_same(on_floats, on_tensors)


def test_changing_the_saved_input_in_place_is_caught():
    """The eager kernel saves its input and recomputes from it in the backward: an in-place
    change between the passes must raise, not give silently wrong gradients."""
    q, x = case("activation", False, False)
    x.requires_grad_()
    inp = x * 1.0
    out = q(inp)
    with torch.no_grad():
        inp.add_(1.0)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        out.sum().backward()
