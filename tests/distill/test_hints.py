"""FitNet: MSE through RepDistiller's ConvReg, sized from the maps' shapes; zero through an
identity regressor; a shape no regressor fits is a one-line error naming both shapes."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from sqakd.distill import BuildContext, build_feature_loss


def fitnet(student_shape, teacher_shape):
    return build_feature_loss("fitnet", {"layer2": student_shape}, {"layer2": teacher_shape},
                              BuildContext())  # fmt: skip


def make_identity(loss, channels):
    conv, bn, _ = loss.regressors["layer2"]
    with torch.no_grad():
        conv.weight.copy_(torch.eye(channels).view(channels, channels, 1, 1))
        conv.bias.zero_()
        bn.running_var.fill_(1 - bn.eps)  # x / sqrt(var + eps) = x exactly
    loss.eval()


def test_fitnet_is_zero_through_an_identity_regressor_and_the_mse_otherwise():
    torch.manual_seed(0)
    loss = fitnet((4, 6, 6), (4, 6, 6))
    make_identity(loss, 4)
    f = torch.relu(torch.randn(2, 4, 6, 6))  # stage outputs are non-negative
    assert float(loss({"layer2": f}, {"layer2": f.clone()})) == 0.0
    t = torch.relu(torch.randn(2, 4, 6, 6))
    assert float(loss({"layer2": f}, {"layer2": t})) == pytest.approx(float(F.mse_loss(f, t)))


@pytest.mark.parametrize(
    ("student", "teacher", "kind"),
    [((4, 8, 8), (6, 4, 4), nn.Conv2d), ((4, 4, 4), (6, 8, 8), nn.ConvTranspose2d),
     ((4, 6, 6), (6, 4, 4), nn.Conv2d), ((4, 4, 4), (6, 4, 4), nn.Conv2d)],
)  # fmt: skip
def test_the_regressor_maps_the_student_shape_to_the_teachers(student, teacher, kind):
    loss = fitnet(student, teacher)
    assert isinstance(loss.regressors["layer2"][0], kind)
    s = torch.randn(2, *student, requires_grad=True)
    t = torch.randn(2, *teacher, requires_grad=True)
    loss({"layer2": s}, {"layer2": t}).backward()
    assert s.grad.abs().sum() > 0 and t.grad is None
    assert all(p.grad is not None for p in loss.parameters())


def test_a_shape_without_a_regressor_is_one_line_naming_both_shapes():
    with pytest.raises(
        ValueError, match=r"student's \(4, 3, 3\) map to the teacher's \(6, 8, 8\)"
    ) as e:
        fitnet((4, 3, 3), (6, 8, 8))
    assert "\n" not in str(e.value)
