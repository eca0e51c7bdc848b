"""FSP: the Gram matrices between consecutive maps against explicit sums; zero for equal maps;
channel counts that would need an adapter are a one-line error naming both shapes."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from sqakd.distill import BuildContext, build_feature_loss
from sqakd.distill.fsp import fsp_matrix

SHAPES = {"layer1:input": (3, 8, 8), "layer1": (3, 8, 8), "layer2": (5, 4, 4)}


def test_the_fsp_matrix_is_the_mean_over_positions_of_channel_products():
    torch.manual_seed(0)
    bottom, top = torch.randn(2, 3, 4, 4), torch.randn(2, 5, 4, 4)
    g = fsp_matrix(bottom, top)
    for b in range(2):
        for i in range(3):
            for j in range(5):
                assert float(g[b, i, j]) == pytest.approx(
                    float((bottom[b, i] * top[b, j]).mean()), abs=1e-6
                )
    big = torch.randn(2, 3, 8, 8)  # the larger map is pooled to the smaller
    torch.testing.assert_close(fsp_matrix(big, top), fsp_matrix(F.adaptive_avg_pool2d(big, 4), top))


def test_fsp_sums_pairs_and_is_zero_for_equal_maps():
    torch.manual_seed(1)
    loss = build_feature_loss("fsp", SHAPES, SHAPES, BuildContext())
    s = {k: torch.randn(2, *shape) for k, shape in SHAPES.items()}
    t = {k: torch.randn(2, *shape) for k, shape in SHAPES.items()}
    assert float(loss(s, {k: v.clone() for k, v in s.items()})) == 0.0
    keys = list(SHAPES)
    expected = sum(
        float((fsp_matrix(s[a], s[b]) - fsp_matrix(t[a], t[b])).pow(2).mean())
        for a, b in zip(keys, keys[1:])
    )
    assert float(loss(s, t)) == pytest.approx(expected, rel=1e-6) and expected > 0
    grads = {k: v.requires_grad_() for k, v in s.items()}
    teacher = {k: v.requires_grad_() for k, v in t.items()}
    loss(grads, teacher).backward()
    assert all(v.grad is not None for v in grads.values())
    assert all(v.grad is None for v in teacher.values())


def test_channels_that_would_need_an_adapter_are_one_line_naming_both_shapes():
    student = {**SHAPES, "layer2": (6, 4, 4)}
    with pytest.raises(
        ValueError,
        match=r"student's maps \(3, 8, 8\), \(6, 4, 4\) and the teacher's \(3, 8, 8\), \(5, 4, 4\)",
    ) as e:
        build_feature_loss("fsp", student, SHAPES, BuildContext())
    assert "\n" not in str(e.value)
