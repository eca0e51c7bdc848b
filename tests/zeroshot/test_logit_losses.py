"""AdaDFQ's generator terms and its student logit term, on values against the formulas."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from sqakd.zeroshot import (
    agreement_loss,
    disagreement_loss,
    entropy,
    margin_loss,
    normalised_entropy,
    softened_difference_entropy,
)


def logits(batch: int = 6, classes: int = 5, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(batch, classes, generator=generator), torch.randn(
        batch, classes, generator=generator
    )


def test_disagreement_and_agreement_are_cross_entropies_of_the_difference_and_the_sum():
    t, s = logits()
    y = torch.tensor([0, 1, 2, 3, 4, 0])
    manual = -F.log_softmax(t - s, dim=1)[torch.arange(6), y].mean()
    torch.testing.assert_close(disagreement_loss(t, s, y), manual)
    manual = -F.log_softmax(t + s, dim=1)[torch.arange(6), y].mean()
    torch.testing.assert_close(agreement_loss(t, s, y), manual)


def test_normalised_entropy_spans_the_batch_minimum_to_the_uniform_maximum():
    t, s = logits()
    values = normalised_entropy(t, s)
    p = F.softmax(t - s, dim=1)
    h = -(p * p.log()).sum(dim=1)
    torch.testing.assert_close(entropy(t - s), h)
    torch.testing.assert_close(values, (h - h.min()) / (math.log(5) - h.min()))
    assert float(values.min()) == 0.0 and float(values.max()) < 1.0


@pytest.mark.parametrize("batch", [3, 7, 200])  # never a hard-coded batch size
def test_the_margin_hinge_is_zero_inside_the_bounds_and_grows_outside(batch):
    t, s = logits(batch)
    normalised = normalised_entropy(t, s)
    expected = torch.relu(0.1 - normalised).mean() + torch.relu(normalised - 0.8).mean()
    torch.testing.assert_close(margin_loss(t, s), expected)
    assert float(margin_loss(t, s, low=0.0, high=1.0)) == 0.0  # every H' is in [0, 1]
    assert float(margin_loss(t, s, low=0.0, high=0.0)) > 0
    t.requires_grad_(True)
    margin_loss(t, s, low=0.5, high=0.6).backward()
    assert t.grad is not None and t.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="margin bounds"):
        margin_loss(t, s, low=0.9, high=0.1)


def test_the_student_entropy_term_is_lowest_when_the_student_matches_up_to_a_shift():
    t, s = logits()
    temperature = 20.0
    shifted = t + torch.randn(6, 1)  # s = t + const per sample: uniform difference
    floor = -(temperature**2) * math.log(5)
    torch.testing.assert_close(
        softened_difference_entropy(shifted, t, temperature), torch.tensor(floor)
    )
    value = softened_difference_entropy(s, t, temperature)
    assert float(value) > floor
    p = F.softmax((t - s) / temperature, dim=1)
    torch.testing.assert_close(value, temperature**2 * (p * p.log()).sum(dim=1).mean())
    t.requires_grad_(True)
    s.requires_grad_(True)
    softened_difference_entropy(s, t, temperature).backward()
    assert t.grad is None and s.grad.abs().sum() > 0  # the teacher's logits are constants
