"""AKT's refined feature distillation on values: the attention maps, the softened KL in the
teacher-to-student direction, the reductions, zero for identical maps, gradients to the student."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from sqakd.distill import (
    RefinedFeatureDistillation,
    channel_attention,
    softened_kl,
    spatial_attention,
)


def maps(seed: int, shape=(4, 6, 5, 3)) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def test_the_attention_maps_are_per_sample_vectors_of_the_formula():
    features = maps(0)
    channel = channel_attention(features)
    assert channel.shape == (4, 6)
    torch.testing.assert_close(channel.sum(dim=1), torch.ones(4))  # a distribution over C
    torch.testing.assert_close(channel, F.softmax((features**2).mean(dim=(2, 3)), dim=1))
    spatial = spatial_attention(features)
    assert spatial.shape == (4, 15)
    torch.testing.assert_close(spatial.norm(dim=1), torch.ones(4))  # unit L2 norm (the AT map)
    energy = (features**2).mean(dim=1).flatten(1)
    torch.testing.assert_close(spatial, energy / energy.norm(dim=1, keepdim=True))
    for vector in (channel, spatial):  # re-softened: distributions
        torch.testing.assert_close(F.softmax(vector / 8, dim=1).sum(dim=1), torch.ones(4))


def test_softened_kl_is_teacher_to_student_summed_or_averaged_over_the_batch():
    student, teacher = maps(1, (5, 7)), maps(2, (5, 7))
    q, p = F.softmax(teacher / 8, dim=1), F.softmax(student / 8, dim=1)
    per_sample = (q * (q.log() - p.log())).sum(dim=1)
    torch.testing.assert_close(softened_kl(student, teacher, 8.0), per_sample.sum())
    torch.testing.assert_close(softened_kl(student, teacher, 8.0, "mean"), per_sample.mean())


def test_rfd_is_zero_for_identical_maps_positive_otherwise_and_reduces_as_asked():
    teacher = {"a": maps(3), "b": maps(4, (4, 2, 3, 3))}
    rfd = RefinedFeatureDistillation(temperature=8.0)
    assert float(rfd(dict(teacher), teacher)) == pytest.approx(0.0, abs=1e-7)
    student = {"a": maps(5), "b": maps(6, (4, 2, 3, 3))}
    total = rfd(student, teacher)
    layers = [sum(rfd.layer_terms(student[k], teacher[k])) for k in ("a", "b")]
    assert float(total) > 0 and all(float(v) > 0 for v in layers)
    torch.testing.assert_close(total, layers[0] + layers[1])
    channel, spatial = rfd.layer_terms(student["a"], teacher["a"])
    expected = softened_kl(channel_attention(student["a"]), channel_attention(teacher["a"]), 8.0)
    torch.testing.assert_close(channel, expected)
    expected = softened_kl(spatial_attention(student["a"]), spatial_attention(teacher["a"]), 8.0)
    torch.testing.assert_close(spatial, expected)
    # the paper's mean over layers; a per-sample mean over the batch (batch of 4)
    torch.testing.assert_close(RefinedFeatureDistillation(8.0, "mean")(student, teacher), total / 2)
    torch.testing.assert_close(
        RefinedFeatureDistillation(8.0, batch_reduction="mean")(student, teacher), total / 4
    )


def test_rfd_sends_gradient_to_the_student_maps_only():
    teacher = maps(7).requires_grad_(True)
    student = maps(8).requires_grad_(True)
    RefinedFeatureDistillation()({"x": student}, {"x": teacher}).backward()
    assert teacher.grad is None and student.grad is not None and student.grad.abs().sum() > 0


def test_rfd_refuses_mismatched_layers_and_shapes():
    rfd = RefinedFeatureDistillation()
    with pytest.raises(ValueError, match="same non-empty set"):
        rfd({"a": maps(0)}, {"b": maps(0)})
    with pytest.raises(ValueError, match="one shape"):
        rfd({"a": maps(0)}, {"a": maps(0, (4, 6, 3, 3))})
    with pytest.raises(ValueError, match="positive"):
        RefinedFeatureDistillation(temperature=0)
