"""The logit terms of GDFQ/AdaDFQ/AKT, on teacher logits ``t`` and student logits ``s`` [B, K].

Generator (AdaDFQ, Qian et al. 2023), with ``y`` the labels the images were generated for:

- disagreement ``CE(t - s, y)`` and agreement ``CE(t + s, y)`` (mean over the batch);
- the margin hinge on the normalised entropy of ``softmax(t - s)``::

      H_i  = entropy(softmax(t_i - s_i)),   H' = (H - min_b H) / (log K - min_b H)
      L_h  = mean_i max(low - H'_i, 0) + mean_i max(H'_i - high, 0)

  (the batch minimum is differentiated, as released; the zero vector of the hinge is never sized
  by a hard-coded batch).

Student (AdaDFQ's logit term, kept by AKT): ``-T^2 * mean_b entropy(softmax((t - s) / T))`` with
``t`` constant; largest when ``s = t + const`` per sample. Negative, bounded below by
``-T^2 log K``.

Every term is computed in float32: bfloat16 logits from an autocast forward (``run.precision:
bf16``) are upcast before the difference, the sum or the softmax.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor


def entropy(logits: Tensor) -> Tensor:
    """Entropy of ``softmax(logits)`` per row (natural log), in float32."""
    log_p = F.log_softmax(logits.float(), dim=1)
    return -(log_p.exp() * log_p).sum(dim=1)


def disagreement_loss(teacher_logits: Tensor, student_logits: Tensor, labels: Tensor) -> Tensor:
    """``CE(t - s, y)``."""
    return F.cross_entropy(teacher_logits.float() - student_logits.float(), labels)


def agreement_loss(teacher_logits: Tensor, student_logits: Tensor, labels: Tensor) -> Tensor:
    """``CE(t + s, y)``."""
    return F.cross_entropy(teacher_logits.float() + student_logits.float(), labels)


def normalised_entropy(teacher_logits: Tensor, student_logits: Tensor) -> Tensor:
    """``H'`` of the module docstring, per sample: 0 for the batch's most confident
    disagreement, 1 for a uniform one."""
    values = entropy(teacher_logits.float() - student_logits.float())
    lowest = values.min()
    top = math.log(teacher_logits.shape[1])
    return (values - lowest) / (top - lowest).clamp_min(1e-12)


def margin_loss(
    teacher_logits: Tensor, student_logits: Tensor, low: float = 0.1, high: float = 0.8
) -> Tensor:
    """AdaDFQ's hinge keeping the normalised disagreement entropy within ``[low, high]``."""
    if not 0 <= low <= high <= 1:
        raise ValueError(f"margin bounds must satisfy 0 <= low <= high <= 1, got {low}, {high}")
    normalised = normalised_entropy(teacher_logits, student_logits)
    return torch.relu(low - normalised).mean() + torch.relu(normalised - high).mean()


def softened_difference_entropy(
    student_logits: Tensor, teacher_logits: Tensor, temperature: float = 20.0
) -> Tensor:
    """AdaDFQ's student logit term ``-T^2 * mean_b entropy(softmax((t - s) / T))``, ``t``
    constant."""
    difference = (teacher_logits.detach().float() - student_logits.float()) / temperature
    return -(temperature**2) * entropy(difference).mean()
