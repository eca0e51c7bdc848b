"""VID: the Gaussian negative log-likelihood (without its constant) of the teacher's map under
the regressor's mean and per-channel variance; its minimum when the mean is exact."""

from __future__ import annotations

import math

import pytest
import torch

from sqakd.distill import BuildContext, build_feature_loss


def vid(cs=4, ct=4):
    return build_feature_loss("vid", {"layer1": (cs, 4, 4)}, {"layer1": (ct, 4, 4)}, BuildContext())


def test_the_variance_starts_at_five_and_the_loss_is_the_gaussian_nll():
    torch.manual_seed(0)
    loss = vid(3, 5)
    module = loss.regressors["layer1"]
    torch.testing.assert_close(module.variance(), torch.full((5,), 5.0))
    s, t = torch.randn(2, 3, 4, 4), torch.randn(2, 5, 4, 4)
    with torch.no_grad():
        mean = module.regressor(s)
        normal = torch.distributions.Normal(mean, module.variance().view(1, -1, 1, 1).sqrt())
        expected = (-normal.log_prob(t) - 0.5 * math.log(2 * math.pi)).mean()
    assert float(loss({"layer1": s}, {"layer1": t})) == pytest.approx(float(expected), rel=1e-5)


def test_with_an_exact_mean_the_loss_is_its_minimum_half_log_variance():
    loss = vid(4, 4)
    module = loss.regressors["layer1"]
    with torch.no_grad():
        for index in (0, 2, 4):
            module.regressor[index].weight.copy_(torch.eye(4).view(4, 4, 1, 1))
    f = torch.relu(torch.randn(2, 4, 4, 4))
    value = float(loss({"layer1": f}, {"layer1": f.clone()}))
    assert value == pytest.approx(0.5 * math.log(5.0), rel=1e-6)
    assert float(loss({"layer1": f}, {"layer1": f + 1})) > value
    with torch.no_grad():
        module.log_scale.fill_(-30.0)  # variance at its floor 1e-5: the lowest value
    assert float(loss({"layer1": f}, {"layer1": f.clone()})) == pytest.approx(
        0.5 * math.log(1e-5), rel=1e-4
    )


def test_gradients_reach_the_student_regressor_and_variance_never_the_teacher():
    loss = vid(3, 5)
    s = torch.randn(2, 3, 8, 8, requires_grad=True)  # a larger student map is pooled to 4x4
    t = torch.randn(2, 5, 4, 4, requires_grad=True)
    loss({"layer1": s}, {"layer1": t}).backward()
    assert s.grad.abs().sum() > 0 and t.grad is None
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in loss.parameters())
