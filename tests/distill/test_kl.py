import math

import pytest
import torch

from sqakd.distill import build_loss, kd_kl_divergence


def test_kl_matches_hand_computation():
    # teacher logits [2, 0] at T = 2 -> softmax([1, 0]) = [e/(e+1), 1/(e+1)]; student [0, 0] -> [1/2, 1/2]
    p = math.e / (math.e + 1)
    expected = 4 * (p * math.log(p / 0.5) + (1 - p) * math.log((1 - p) / 0.5))  # T**2 * KL
    value = kd_kl_divergence(
        torch.tensor([[0.0, 0.0]]), torch.tensor([[2.0, 0.0]]), temperature=2.0
    )
    assert value.item() == pytest.approx(expected, rel=1e-6)
    assert expected == pytest.approx(0.44378, abs=1e-5)


def test_kl_is_batch_mean_and_zero_when_equal():
    logits = torch.randn(5, 7)
    assert kd_kl_divergence(logits, logits).item() == pytest.approx(0.0, abs=1e-6)
    one = kd_kl_divergence(torch.tensor([[0.0, 0.0]]), torch.tensor([[2.0, 0.0]]), 2.0)
    two = kd_kl_divergence(torch.tensor([[0.0, 0.0]] * 2), torch.tensor([[2.0, 0.0]] * 2), 2.0)
    assert two.item() == pytest.approx(one.item(), rel=1e-6)


def test_kl_gradient_is_t_times_probability_difference():
    # d/ds [T^2 KL(p_t || softmax(s/T))] = T * (softmax(s/T) - p_t) / batch
    student = torch.tensor([[0.5, -1.0, 2.0]], requires_grad=True)
    teacher = torch.tensor([[1.0, 0.0, -1.0]])
    temperature = 4.0
    kd_kl_divergence(student, teacher, temperature).backward()
    expected = temperature * (
        torch.softmax(student.detach() / 4, 1) - torch.softmax(teacher / 4, 1)
    )
    torch.testing.assert_close(student.grad, expected)


def test_teacher_receives_no_gradient():
    teacher = torch.randn(2, 3, requires_grad=True)
    kd_kl_divergence(torch.randn(2, 3, requires_grad=True), teacher).backward()
    assert teacher.grad is None


def test_unknown_loss_lists_known():
    with pytest.raises(ValueError, match="kl"):
        build_loss("nope")


def test_sequence_logits_reduce_per_token():
    """(B, T, V) logits with class_dim=-1: the mean of the per-token (B*T rows of V) losses; equal
    per-token distributions give 0 (the softmax over dim 1 would compare positions)."""
    student, teacher = torch.randn(3, 5, 11), torch.randn(3, 5, 11)
    per_token = kd_kl_divergence(student.reshape(15, 11), teacher.reshape(15, 11), 2.0)
    torch.testing.assert_close(kd_kl_divergence(student, teacher, 2.0, class_dim=-1), per_token)
    same = torch.randn(2, 1, 7).expand(2, 6, 7)  # identical distributions, position by position
    shifted = same + torch.randn(2, 6, 1)  # a per-token constant leaves softmax unchanged
    assert kd_kl_divergence(shifted, same, 4.0, class_dim=-1).item() == pytest.approx(0, abs=1e-5)
    assert kd_kl_divergence(shifted, same, 4.0).item() > 0.1  # over dim 1, positions compared


def test_segmentation_logits_reduce_per_pixel():
    student, teacher = torch.randn(2, 4, 3, 3), torch.randn(2, 4, 3, 3)
    rows = lambda t: t.permute(0, 2, 3, 1).reshape(-1, 4)  # noqa: E731
    torch.testing.assert_close(
        kd_kl_divergence(student, teacher), kd_kl_divergence(rows(student), rows(teacher))
    )


def test_a_class_dim_outside_the_logits_is_refused():
    with pytest.raises(ValueError, match="class_dim 2 is not an axis"):
        kd_kl_divergence(torch.randn(2, 3), torch.randn(2, 3), class_dim=2)
