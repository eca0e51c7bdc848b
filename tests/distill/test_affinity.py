import io
import math

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from sqakd.distill import (
    FastFeatureAffinity,
    FeatureAffinity,
    fast_feature_affinity_loss,
    feature_affinity_loss,
    gaussian_projection,
)


def maps(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def brute_force_affinity(feature_map: torch.Tensor) -> torch.Tensor:
    """[B, C, H, W] -> [B, N, N]: cosine of every pair of positions, one pair at a time."""
    batch, _, height, width = feature_map.shape
    n = height * width
    vectors = feature_map.flatten(2)
    affinity = torch.zeros(batch, n, n, dtype=torch.float64)
    for b in range(batch):
        for i in range(n):
            for j in range(n):
                u, v = vectors[b, :, i].double(), vectors[b, :, j].double()
                affinity[b, i, j] = (u @ v) / ((u.norm() + 1e-5) * (v.norm() + 1e-5))
    return affinity


def test_fa_equals_brute_force_double_loop():
    student, teacher = maps(2, 3, 4, 5, seed=1), maps(2, 3, 4, 5, seed=2)
    student[0, :, 1, 2] = 0  # an all-zero position (after a ReLU): the eps keeps it finite
    difference = brute_force_affinity(student) - brute_force_affinity(teacher)
    n = 20
    expected_l1 = difference.abs().sum() / n**2  # summed over the batch
    expected_l2 = difference.pow(2).sum().sqrt() / n  # one norm over the whole [B, N, N] tensor
    assert feature_affinity_loss(student, teacher).item() == pytest.approx(
        expected_l1.item(), rel=1e-5
    )
    assert feature_affinity_loss(student, teacher, order=2).item() == pytest.approx(
        expected_l2.item(), rel=1e-5
    )


def test_teacher_is_resized_bilinear_align_corners_to_the_student_size():
    student, teacher = maps(2, 3, 5, 5, seed=1), maps(2, 3, 3, 3, seed=2)
    resized = F.interpolate(teacher, size=(5, 5), mode="bilinear", align_corners=True)
    for order in (1, 2):
        torch.testing.assert_close(
            feature_affinity_loss(student, teacher, order),
            feature_affinity_loss(student, resized, order),
        )
    projection = gaussian_projection(25, 7)
    torch.testing.assert_close(
        fast_feature_affinity_loss(student, teacher, projection),
        fast_feature_affinity_loss(student, resized, projection),
    )


def test_losses_sum_over_the_batch():
    student, teacher = maps(1, 4, 6, 6, seed=1), maps(1, 4, 6, 6, seed=2)
    twice = torch.cat([student, student]), torch.cat([teacher, teacher])
    projection = gaussian_projection(36, 5)
    assert feature_affinity_loss(*twice).item() == pytest.approx(
        2 * feature_affinity_loss(student, teacher).item(), rel=1e-5
    )
    assert fast_feature_affinity_loss(*twice, projection).item() == pytest.approx(
        2 * fast_feature_affinity_loss(student, teacher, projection).item(), rel=1e-5
    )


@pytest.mark.parametrize("order", [1, 2])
def test_zero_for_identical_features_positive_otherwise(order):
    features = torch.relu(maps(3, 8, 6, 6, seed=1))
    other = torch.relu(maps(3, 8, 6, 6, seed=2))
    projection = gaussian_projection(36)
    assert feature_affinity_loss(features, features.clone(), order).item() == pytest.approx(
        0, abs=1e-6
    )
    assert fast_feature_affinity_loss(features, features.clone(), projection, order).item() == (
        pytest.approx(0, abs=1e-6)
    )
    assert feature_affinity_loss(features, other, order).item() > 1e-3
    assert fast_feature_affinity_loss(features, other, projection, order).item() > 1e-3


def test_ffa_order_two_approaches_fa_order_two_as_k_grows():
    student, teacher = maps(2, 8, 8, 8, seed=1), maps(2, 8, 8, 8, seed=2)
    exact = feature_affinity_loss(student, teacher, order=2).item()
    seeds = range(8)
    mean_errors = {}
    for k in (4, 64, 1024):
        errors = [
            abs(
                fast_feature_affinity_loss(
                    student, teacher, gaussian_projection(64, k, seed), 2
                ).item()
                / exact
                - 1
            )
            for seed in seeds
        ]
        mean_errors[k] = sum(errors) / len(errors)
        # 1 / sqrt(2k) is the relative standard deviation when A_s - A_t has rank one (the worst case)
        assert mean_errors[k] < 1 / math.sqrt(2 * k), (k, mean_errors)
    assert mean_errors[1024] < mean_errors[64] < mean_errors[4]


def test_ffa_order_one_estimates_row_norms_not_fa_order_one():
    student, teacher = maps(2, 8, 6, 6, seed=1), maps(2, 8, 6, 6, seed=2)
    flat = [
        m.flatten(2) / (m.flatten(2).norm(dim=1, keepdim=True) + 1e-5) for m in (student, teacher)
    ]
    difference = sum(sign * f.transpose(1, 2) @ f for sign, f in zip((1, -1), flat))
    rows = math.sqrt(2 / math.pi) * difference.norm(dim=2).sum() / 36**2
    estimate = fast_feature_affinity_loss(student, teacher, gaussian_projection(36, 20000))
    assert estimate.item() == pytest.approx(rows.item(), rel=0.02)
    assert abs(estimate.item() / feature_affinity_loss(student, teacher).item() - 1) > 0.1


class LargestOutput(TorchDispatchMode):
    """Records the largest number of elements of any tensor an operator returns."""

    def __init__(self) -> None:
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(tensor, torch.Tensor):
                self.largest = max(self.largest, tensor.numel())
        return out


def test_ffa_never_builds_an_n_by_n_tensor_forward_or_backward():
    n = 16 * 16
    student = maps(2, 8, 16, 16, seed=1).requires_grad_()
    teacher = maps(2, 8, 32, 32, seed=2)  # resized to 16 x 16
    projection = gaussian_projection(n)
    for order in (1, 2):
        with LargestOutput() as fast:
            fast_feature_affinity_loss(student, teacher, projection, order).backward()
        assert fast.largest < n * n, (order, fast.largest)
    with LargestOutput() as exact:  # the check does see FA's [B, N, N] affinities
        feature_affinity_loss(student, teacher).backward()
    assert exact.largest >= n * n


@pytest.mark.parametrize("fast", [False, True])
def test_gradients_reach_the_student_never_the_teacher(fast):
    student = maps(2, 4, 6, 6, seed=1)
    student[0, :, 2, 3] = 0  # an all-zero position: finite thanks to the eps in the normalisation
    student.requires_grad_()
    teacher = maps(2, 4, 6, 6, seed=2).requires_grad_()
    if fast:
        loss = FastFeatureAffinity({"stage": 36})({"stage": student}, {"stage": teacher})
    else:
        loss = FeatureAffinity()({"stage": student}, {"stage": teacher})
    assert loss.requires_grad
    loss.backward()
    assert teacher.grad is None
    assert student.grad is not None and torch.isfinite(student.grad).all()
    assert student.grad.abs().sum() > 0


def test_modules_sum_over_taps():
    student = {"layer1.0": maps(2, 4, 8, 8, seed=1), "layer2": maps(2, 6, 4, 4, seed=2)}
    teacher = {"layer1.0": maps(2, 4, 16, 16, seed=3), "layer2": maps(2, 6, 4, 4, seed=4)}
    for order in (1, 2):
        expected = sum(feature_affinity_loss(student[t], teacher[t], order) for t in student)
        torch.testing.assert_close(FeatureAffinity(order)(student, teacher), expected)
        ffa = FastFeatureAffinity({"layer1.0": 64, "layer2": 16}, k=9, seed=5, order=order)
        expected = sum(
            fast_feature_affinity_loss(student[t], teacher[t], ffa.projection(t), order)
            for t in student
        )
        torch.testing.assert_close(ffa(student, teacher), expected)


def test_projection_is_a_seeded_checkpointed_buffer_apart_from_the_global_rng():
    torch.manual_seed(123)
    first = FastFeatureAffinity({"layer1.0": 64, "layer3": 16}, k=15, seed=7)
    torch.manual_seed(456)
    state_before = torch.get_rng_state()
    second = FastFeatureAffinity({"layer1.0": 64, "layer3": 16}, k=15, seed=7)
    assert torch.equal(torch.get_rng_state(), state_before)  # the global RNG is not advanced
    for tap in ("layer1.0", "layer3"):
        assert torch.equal(first.projection(tap), second.projection(tap))  # nor read
    assert first.projection("layer1.0").shape == (64, 15)
    assert not list(first.parameters())
    assert set(first.state_dict()) == {"projections.layer1/0", "projections.layer3"}

    other = FastFeatureAffinity({"layer1.0": 64, "layer3": 16}, k=15, seed=8)
    assert not torch.equal(other.projection("layer3"), first.projection("layer3"))
    buffer = io.BytesIO()
    torch.save(first.state_dict(), buffer)
    buffer.seek(0)
    other.load_state_dict(torch.load(buffer))
    assert torch.equal(other.projection("layer1.0"), first.projection("layer1.0"))
    assert torch.equal(other.projection("layer3"), first.projection("layer3"))


def test_different_channel_counts_give_one_line_naming_both_shapes():
    with pytest.raises(ValueError) as error:
        feature_affinity_loss(maps(2, 16, 8, 8), maps(2, 32, 8, 8))
    message = str(error.value)
    assert "(2, 16, 8, 8)" in message and "(2, 32, 8, 8)" in message and "\n" not in message
    with pytest.raises(ValueError, match=r"\(2, 16, 8, 8\).*\(2, 32, 8, 8\)"):
        FastFeatureAffinity({"s": 64})({"s": maps(2, 16, 8, 8)}, {"s": maps(2, 32, 8, 8)})


def test_misfit_inputs_name_the_problem():
    with pytest.raises(ValueError, match="does not fit N = 64"):
        fast_feature_affinity_loss(maps(1, 2, 8, 8), maps(1, 2, 8, 8), gaussian_projection(16))
    with pytest.raises(ValueError, match="order must be 1"):
        FeatureAffinity(order=3)
    with pytest.raises(ValueError, match="built for"):
        FastFeatureAffinity({"a": 4})({"b": maps(1, 2, 2, 2)}, {"b": maps(1, 2, 2, 2)})
    with pytest.raises(ValueError, match="differ"):
        FeatureAffinity()({"a": maps(1, 2, 2, 2)}, {"b": maps(1, 2, 2, 2)})
    with pytest.raises(TypeError, match="dict"):
        FeatureAffinity()(maps(1, 2, 2, 2), maps(1, 2, 2, 2))
