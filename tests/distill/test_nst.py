"""NST as released: the squared MMD of L2-normalised channel vectors with the kernel (x.y)^2,
checked against explicit sums over channel pairs."""

from __future__ import annotations

import pytest
import torch

from sqakd.distill import build_feature_loss
from sqakd.distill.nst import nst_loss


def reference(student: torch.Tensor, teacher: torch.Tensor) -> float:
    def channels(x):
        flat = x.flatten(2)
        return [[flat[b, c] / flat[b, c].norm() for c in range(flat.shape[1])]
                for b in range(flat.shape[0])]  # fmt: skip

    s, t = channels(student), channels(teacher)

    def mean_kernel(x, y):
        values = [float(torch.dot(x[b][i], y[b][j])) ** 2 for b in range(len(x))
                  for i in range(len(x[b])) for j in range(len(y[b]))]  # fmt: skip
        return sum(values) / len(values)

    return mean_kernel(t, t) + mean_kernel(s, s) - 2 * mean_kernel(s, t)


def test_nst_equals_the_kernel_sums():
    torch.manual_seed(0)
    s, t = torch.randn(2, 3, 3, 3), torch.randn(2, 4, 3, 3)
    assert float(nst_loss(s, t)) == pytest.approx(reference(s, t), rel=1e-5)


def test_nst_is_zero_for_equal_maps_and_positive_otherwise():
    torch.manual_seed(1)
    loss = build_feature_loss("nst", {}, {})
    maps = {"layer1": torch.randn(2, 4, 5, 5)}
    assert float(loss(maps, {"layer1": maps["layer1"].clone()})) == pytest.approx(0.0, abs=1e-6)
    assert float(loss(maps, {"layer1": torch.randn(2, 4, 5, 5)})) > 0


def test_gradients_reach_the_student_map_never_the_teacher():
    s = torch.randn(2, 3, 4, 4, requires_grad=True)
    t = torch.randn(2, 3, 4, 4, requires_grad=True)
    nst_loss(s, t).backward()
    assert s.grad.abs().sum() > 0 and t.grad is None
