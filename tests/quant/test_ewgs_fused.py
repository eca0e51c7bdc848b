"""The fused EWGS forward/backward gives the values and gradients of the step-by-step definition
(normalise, clamp, ewgs_round, rescale), for both roles, per tensor and per channel, in either
memory layout, for EWGS (delta > 0) and STE (delta = 0)."""

import pytest
import torch

from sqakd.quant.methods.ewgs import EWGSQuantizer, ewgs_round


def reference(q: EWGSQuantizer, x: torch.Tensor) -> torch.Tensor:
    """The EWGS quantizer written out op by op (what the paper's code computes)."""
    rounded = ewgs_round(q.normalise(x), q.num_steps, q.delta)
    if q.role == "activation":
        return rounded
    return q.output_scale.abs() * (2.0 * rounded - 1.0)


def grads_of(q: EWGSQuantizer, x: torch.Tensor, upstream: torch.Tensor, fn) -> list[torch.Tensor]:
    x = x.detach().clone().requires_grad_()
    out = fn(q, x)
    params = [x, q.lower, q.upper] + ([q.output_scale] if q.role == "weight" else [])
    return [out.detach(), *torch.autograd.grad(out, params, upstream)]


@pytest.mark.parametrize("delta", [0.0, 0.05])
@pytest.mark.parametrize(
    "role, per_channel, channels_last",
    [("activation", False, False), ("activation", False, True), ("weight", False, False),
     ("weight", True, False)],
)  # fmt: skip
def test_fused_matches_the_step_by_step_definition(role, per_channel, channels_last, delta):
    torch.manual_seed(0)
    x = torch.randn(6, 4, 5, 5)
    if role == "activation":
        x = torch.relu(x)  # exact zeros sit on the lower bound after initialisation
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    q = EWGSQuantizer(3, role, per_channel=per_channel, delta=delta)
    q.calibrate(x)
    upstream = torch.randn(x.shape)
    fused = grads_of(q, x, upstream, lambda module, inp: module(inp))
    expected = grads_of(q, x, upstream, reference)
    assert fused[0].shape == expected[0].shape
    torch.testing.assert_close(fused[0], expected[0], rtol=0, atol=1e-6)
    for got, want in zip(fused[1:], expected[1:]):
        assert got.shape == want.shape
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_gradient_flows_at_the_lower_bound_like_clamp():
    """x == lower (ReLU zeros with lower = min = 0) is inside the range, as torch.clamp says."""
    q = EWGSQuantizer(2, "activation", delta=0.0)
    q.lower.data.fill_(0.0)
    q.upper.data.fill_(3.0)
    q.initialized.fill_(True)
    x = torch.tensor([0.0, 1.0, 4.0], requires_grad=True)
    q(x).sum().backward()
    torch.testing.assert_close(x.grad, torch.tensor([1 / 3, 1 / 3, 0.0]))
    # t = [0, 1/3] inside, the clipped 4.0 has t = 1 whatever l and u: no gradient from it.
    # du = -sum(G t) / w = -(1/3) / 3; dl = sum(G (t - 1)) / w = ((0 - 1) + (1/3 - 1)) / 3
    torch.testing.assert_close(q.upper.grad, torch.tensor(-1 / 9))
    torch.testing.assert_close(q.lower.grad, torch.tensor(-5 / 9))
