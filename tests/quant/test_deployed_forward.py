"""In eval mode without autograd, an activation quantizer with a uniform per-tensor grid computes
its output the way the exported ONNX graph does (``Quantizer.deployed_forward``); in training,
or with autograd on, it runs its own method's forward."""

import pytest
import torch

from sqakd.quant import build_quantizer
from sqakd.quant.grid import activation_form

METHODS = ["ewgs", "ste", "pact", "lsq", "lsq+", "dorefa", "dsq", "minmax"]


def calibrated(method: str, bits: int):
    torch.manual_seed(0)
    x = torch.relu(torch.randn(8, 4, 6, 6)) - 0.05
    q = build_quantizer(method, bits, "activation")
    q.calibrate(x)
    return q, torch.linspace(-0.5, 4.0, 20001)


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("method", METHODS)
def test_deployed_codes_equal_the_methods_own_away_from_ties(method, bits):
    q, x = calibrated(method, bits)
    q.eval()
    with torch.no_grad():
        deployed = q(x)
    own = q.quantize(x).detach()
    # the two may only differ where x / step sits within float error of a rounding tie
    differ = (deployed - own).abs() > 1e-5
    assert differ.float().mean() <= 0.001
    assert len(deployed.unique()) <= 2**bits


def test_deployed_forward_is_the_export_arithmetic_written_out():
    """EWGS 4-bit: ``(round(clip(x + shift) / s) + z - z_out) * s_out (+ shift)``, from the grid."""
    q, x = calibrated("ewgs", 4)
    form = activation_form(q.grid())
    q.eval()
    with torch.no_grad():
        got = q(x)
    y = x + form.pre_shift
    if form.clip is not None:
        y = torch.clamp(y, *form.clip)
    codes = torch.clamp(torch.round(y / form.q_scale) + form.q_zero_point.float(), 0, 255)
    expected = (codes - form.dq_zero_point.float()) * form.dq_scale + form.post_shift
    torch.testing.assert_close(got, expected, rtol=0, atol=0)


@pytest.mark.parametrize("method", ["ewgs", "lsq"])
def test_training_or_autograd_uses_the_methods_forward(method, monkeypatch):
    q, x = calibrated(method, 4)
    calls = []
    monkeypatch.setattr(q, "deployed_forward", lambda t: calls.append(1))
    q.train()
    with torch.no_grad():
        q(x)
    q.eval()
    x.requires_grad_()
    q(x).sum().backward()  # eval with autograd: still differentiable
    assert calls == [] and x.grad is not None


def test_non_uniform_grid_keeps_its_own_forward():
    q = build_quantizer("apot", 4, "activation")
    q.calibrate(torch.rand(64))
    q.eval()
    if q.grid().levels is None:
        pytest.skip("apot activations use a uniform grid here")
    assert q.deployed_forward(torch.rand(10)) is None
