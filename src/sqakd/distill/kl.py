"""Logit distillation (Hinton et al. 2015), the loss SQAKD trains with instead of labels."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from .feature_registry import BuildContext, FeatureLoss, register_feature_loss
from .registry import register_loss


def kd_kl_divergence(
    student_logits: Tensor, teacher_logits: Tensor, temperature: float = 4.0, class_dim: int = 1
) -> Tensor:
    """``T**2 * KL(softmax(teacher / T) || softmax(student / T))`` over the class axis
    ``class_dim``, averaged over the predictions: over the batch for (N, C) logits, over every
    pixel of every image for (N, C, H, W) segmentation logits, over every token for (N, T, V)
    sequence logits (``class_dim=-1``).

    The T**2 factor keeps gradient magnitudes independent of the temperature (Hinton et al.).
    The teacher's logits are treated as constants. Computed in float32 whatever the logits'
    type: bfloat16 logits from an autocast forward (``run.precision: bf16``) are upcast first,
    since autocast runs ``log_softmax`` on the CPU in its input's type.
    """
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"student logits {tuple(student_logits.shape)} and teacher logits "
            f"{tuple(teacher_logits.shape)} differ in shape"
        )
    if student_logits.dim() < 2 or not -student_logits.dim() <= class_dim < student_logits.dim():
        raise ValueError(
            f"class_dim {class_dim} is not an axis of logits of shape "
            f"{tuple(student_logits.shape)}; use 1 for (N, C, ...) or -1 for (N, T, V)"
        )
    student_logits, teacher_logits = student_logits.float(), teacher_logits.float()
    log_p_student = F.log_softmax(student_logits / temperature, dim=class_dim)
    log_p_teacher = F.log_softmax(teacher_logits.detach() / temperature, dim=class_dim)
    kl = F.kl_div(log_p_student, log_p_teacher, reduction="sum", log_target=True)
    predictions = student_logits.numel() // student_logits.shape[class_dim]
    return kl / predictions * temperature**2


@register_loss("kl")
class KLDistillation(nn.Module):
    """:func:`kd_kl_divergence` as a module."""

    def __init__(self, temperature: float = 4.0, class_dim: int = 1) -> None:
        super().__init__()
        self.temperature = temperature
        self.class_dim = class_dim

    def forward(self, student_logits: Tensor, teacher_logits: Tensor) -> Tensor:
        return kd_kl_divergence(student_logits, teacher_logits, self.temperature, self.class_dim)


@register_loss("logit_mse")
class LogitMSE(nn.Module):
    """Mean squared error between student and teacher logits (a common extra logit loss), in
    float32 (see :func:`kd_kl_divergence`)."""

    def forward(self, student_logits: Tensor, teacher_logits: Tensor) -> Tensor:
        return F.mse_loss(student_logits.float(), teacher_logits.detach().float())


@register_feature_loss("kd")
class KDFeatureLoss(FeatureLoss):
    """:func:`kd_kl_divergence` on the key ``"logits"``, in the feature-loss zoo so that a
    recipe can combine it with a feature loss (``losses: {at: 1000, kd: 1}``). The temperature
    is the run's (``BuildContext.temperature``, SQAKD's T = 4 by default); weight 1."""

    weight = 1.0
    reads = "logits"
    option_names = ("temperature",)

    def __init__(self, temperature: float = 4.0) -> None:
        super().__init__()
        self.temperature = temperature

    @classmethod
    def build(cls, student_shapes, teacher_shapes, context: BuildContext, **options):
        return cls(**{"temperature": context.temperature, **options})

    def forward(self, student_features, teacher_features, *, index=None, labels=None) -> Tensor:
        return kd_kl_divergence(
            student_features["logits"], teacher_features["logits"], self.temperature
        )
