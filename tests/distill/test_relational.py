"""SP, RKD and CC against brute-force references: Gram matrices, pairwise distances and angles
computed one pair (or triple) at a time, and CC's products of consecutive differences."""

from __future__ import annotations

import math

import pytest
import torch

from sqakd.distill import BuildContext, build_feature_loss
from sqakd.distill.relational import (
    correlation_congruence_loss,
    rkd_loss,
    similarity_preserving_loss,
)


# ----------------------------------------------------------------------------------------- SP
def sp_reference(student, teacher) -> float:
    batch = student.shape[0]

    def gram(x):
        flat = x.reshape(batch, -1)
        rows = [[float(torch.dot(flat[i], flat[j])) for j in range(batch)] for i in range(batch)]
        return [[v / math.sqrt(sum(w * w for w in row)) for v in row] for row in rows]

    g_s, g_t = gram(student), gram(teacher)
    return sum((g_t[i][j] - g_s[i][j]) ** 2 for i in range(batch) for j in range(batch)) / batch**2


def test_sp_equals_the_gram_matrix_reference_and_is_zero_for_equal_maps():
    torch.manual_seed(0)
    s, t = torch.randn(4, 3, 2, 2), torch.randn(4, 6, 3, 3)  # only the batch must agree
    assert float(similarity_preserving_loss(s, t)) == pytest.approx(sp_reference(s, t), rel=1e-5)
    loss = build_feature_loss("sp", {}, {})
    assert float(loss({"layer3": s}, {"layer3": s.clone()})) == 0.0
    assert float(loss({"layer3": s}, {"layer3": t})) > 0


# ---------------------------------------------------------------------------------------- RKD
def smooth_l1(a: list[float], b: list[float]) -> float:
    return sum(
        0.5 * (x - y) ** 2 if abs(x - y) < 1 else abs(x - y) - 0.5 for x, y in zip(a, b)
    ) / len(a)


def rkd_reference(student, teacher) -> float:
    batch = student.shape[0]

    def distances(e):
        d = [
            float((e[i] - e[j]).norm()) if i != j else 0.0
            for i in range(batch)
            for j in range(batch)
        ]
        positive = [v for v in d if v > 0]
        return [v / (sum(positive) / len(positive)) for v in d]

    def angles(e):
        values = []
        for i in range(batch):
            for j in range(batch):
                for k in range(batch):
                    u, v = e[j] - e[i], e[k] - e[i]
                    nu, nv = max(float(u.norm()), 1e-12), max(float(v.norm()), 1e-12)
                    values.append(float(torch.dot(u, v)) / (nu * nv))
        return values

    distance = smooth_l1(distances(student), distances(teacher))
    angle = smooth_l1(angles(student), angles(teacher))
    return 25 * distance + 50 * angle


def test_rkd_equals_the_distance_and_angle_reference():
    torch.manual_seed(1)
    s, t = torch.randn(5, 3), torch.randn(5, 3) * 3
    assert float(rkd_loss(s, t)) == pytest.approx(rkd_reference(s, t), rel=1e-4)
    loss = build_feature_loss("rkd", {}, {})
    assert float(loss({"fc:input": s}, {"fc:input": s.clone()})) == pytest.approx(0, abs=1e-6)
    assert float(loss({"fc:input": s}, {"fc:input": t})) > 0
    # a scaled copy has the same normalised distances and angles
    assert float(rkd_loss(s, 2 * s)) == pytest.approx(0, abs=1e-6)


def test_rkd_gradients_reach_the_student_never_the_teacher():
    s, t = torch.randn(4, 3, requires_grad=True), torch.randn(4, 3, requires_grad=True)
    rkd_loss(s, t).backward()
    assert s.grad.abs().sum() > 0 and t.grad is None


# ----------------------------------------------------------------------------------------- CC
def test_cc_equals_the_consecutive_products_of_differences():
    torch.manual_seed(2)
    e_s, e_t = torch.randn(4, 3), torch.randn(4, 3)
    d = (e_s - e_t).abs()
    expected = sum(float((d[i] * d[i + 1]).sum()) for i in range(3)) / 3
    assert float(correlation_congruence_loss(e_s, e_t)) == pytest.approx(expected, rel=1e-6)


def cc_loss(dim_s=6, dim_t=6):
    return build_feature_loss("cc", {"fc:input": (dim_s,)}, {"fc:input": (dim_t,)}, BuildContext(),
                              embed_dim=5)  # fmt: skip


def test_cc_is_zero_with_matched_embeddings_and_positive_otherwise():
    torch.manual_seed(3)
    loss = cc_loss()
    loss.embed_teacher["fc:input"].load_state_dict(loss.embed_student["fc:input"].state_dict())
    f = torch.randn(4, 6)
    assert float(loss({"fc:input": f}, {"fc:input": f.clone()})) == 0.0
    assert float(loss({"fc:input": f}, {"fc:input": torch.randn(4, 6)})) > 0


def test_cc_gradients_reach_the_student_and_both_embeddings_never_the_teacher():
    loss = cc_loss(6, 8)
    s, t = torch.randn(4, 6, requires_grad=True), torch.randn(4, 8, requires_grad=True)
    loss({"fc:input": s}, {"fc:input": t}).backward()
    assert s.grad.abs().sum() > 0 and t.grad is None
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in loss.parameters())
    assert loss.embed_teacher["fc:input"].in_features == 8


def test_mismatched_embeddings_are_one_line_errors():
    with pytest.raises(
        ValueError, match=r"CC: student embedding \(4, 5\) and teacher embedding \(4, 6\) differ"
    ):
        correlation_congruence_loss(torch.randn(4, 5), torch.randn(4, 6))
    with pytest.raises(ValueError, match=r"RKD compares \[B, D\] embeddings"):
        rkd_loss(torch.randn(4, 5, 1, 1), torch.randn(4, 5))
