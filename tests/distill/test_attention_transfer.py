"""AT as released: the mean of squared differences of L2-normalised channel-mean-of-squares maps,
checked against a loop over samples and positions."""

from __future__ import annotations

import math

import pytest
import torch

from sqakd.distill import build_feature_loss
from sqakd.distill.attention import attention_transfer_loss


def reference(student: torch.Tensor, teacher: torch.Tensor) -> float:
    total, count = 0.0, 0
    for b in range(student.shape[0]):
        a_s = [float((student[b, :, i, j] ** 2).mean()) for i in range(student.shape[2])
               for j in range(student.shape[3])]  # fmt: skip
        a_t = [float((teacher[b, :, i, j] ** 2).mean()) for i in range(teacher.shape[2])
               for j in range(teacher.shape[3])]  # fmt: skip
        n_s, n_t = math.sqrt(sum(v * v for v in a_s)), math.sqrt(sum(v * v for v in a_t))
        for x, y in zip(a_s, a_t):
            total += (x / n_s - y / n_t) ** 2
            count += 1
    return total / count


def test_at_equals_the_hand_computed_mean_of_squares():
    torch.manual_seed(0)
    s, t = torch.randn(2, 3, 4, 4), torch.randn(2, 5, 4, 4)  # channels may differ
    assert float(attention_transfer_loss(s, t)) == pytest.approx(reference(s, t), rel=1e-5)


def test_at_is_zero_for_equal_maps_summed_over_taps_and_pools_the_larger_map():
    torch.manual_seed(1)
    loss = build_feature_loss("at", {}, {})
    maps = {"a": torch.randn(2, 4, 8, 8), "b": torch.randn(2, 8, 4, 4)}
    assert float(loss(maps, {k: v.clone() for k, v in maps.items()})) == 0.0
    other = {k: torch.randn_like(v) for k, v in maps.items()}
    total = loss(maps, other)
    expected = sum(float(attention_transfer_loss(maps[k], other[k])) for k in maps)
    assert float(total) == pytest.approx(expected) and float(total) > 0
    big, small = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 4, 4)
    pooled = torch.nn.functional.adaptive_avg_pool2d(big, 4)
    torch.testing.assert_close(attention_transfer_loss(big, small),
                               attention_transfer_loss(pooled, small))  # fmt: skip


def test_gradients_reach_the_student_map_never_the_teacher():
    s = torch.randn(2, 3, 4, 4, requires_grad=True)
    t = torch.randn(2, 3, 4, 4, requires_grad=True)
    attention_transfer_loss(s, t).backward()
    assert s.grad.abs().sum() > 0 and t.grad is None


def test_bad_maps_are_one_line_errors():
    with pytest.raises(ValueError, match=r"AT compares \[B, C, H, W\] maps; got student \(2, 3\)"):
        attention_transfer_loss(torch.randn(2, 3), torch.randn(2, 3, 4, 4))
    with pytest.raises(ValueError, match="differ; tap the same names"):
        build_feature_loss("at", {}, {})(
            {"a": torch.randn(1, 1, 2, 2)}, {"b": torch.randn(1, 1, 2, 2)}
        )
