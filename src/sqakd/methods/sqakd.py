"""SQAKD (Zhao & Zhao, AISTATS 2024): QAT as self-supervised distillation from the float teacher.

loss = alpha * T**2 * KL(teacher || student) + gamma * CE(student, labels) + beta * extra_loss

Defaults (released code): T = 4, alpha = 1, gamma = 0, beta = 0, so no label is ever read.
The quantizers' own gradient rules act on the discretisation error; the teacher is frozen in
eval mode and runs without autograd.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..config import MethodConfig
from ..distill import build_loss, kd_kl_divergence
from .base import Method, StepOutput, register_method


@register_method("sqakd")
class SQAKD(Method):
    needs_teacher = True
    quantizes_student = True

    def __init__(self, config: MethodConfig) -> None:
        super().__init__(config)
        self.needs_labels = config.gamma > 0
        if config.beta > 0 and not config.extra_loss:
            raise ValueError(
                "method.beta > 0 needs method.extra_loss (a registered loss name, e.g. logit_mse)"
            )
        self.extra_loss = (
            build_loss(config.extra_loss) if config.beta > 0 and config.extra_loss else None
        )
        if config.alpha == 0 and config.gamma == 0 and config.beta == 0:
            raise ValueError(
                "method.alpha, gamma and beta are all 0: nothing to train; set method.alpha: 1"
            )

    def training_step(
        self, student: nn.Module, teacher: nn.Module | None, images: Tensor, labels: Tensor | None
    ) -> StepOutput:
        if teacher is None:
            raise ValueError("sqakd needs a teacher; set teacher.checkpoint")
        with torch.inference_mode():  # no autograd bookkeeping at all for the frozen teacher
            teacher_logits = teacher(images)
        teacher_logits = teacher_logits.clone()  # a normal tensor autograd may save (tiny: logits)
        logits = student(images)
        cfg = self.config
        losses: dict[str, Tensor] = {}
        if cfg.alpha > 0:
            losses["kd"] = cfg.alpha * kd_kl_divergence(logits, teacher_logits, cfg.temperature)
        if cfg.gamma > 0:
            if labels is None:
                raise ValueError(
                    "method.gamma > 0 needs labels; use labeled data or set method.gamma: 0"
                )
            losses["ce"] = cfg.gamma * F.cross_entropy(logits, labels)
        if self.extra_loss is not None:
            losses[self.config.extra_loss or "extra"] = cfg.beta * self.extra_loss(
                logits, teacher_logits
            )
        return StepOutput(logits, losses)


@register_method("qat")
class LabeledQAT(Method):
    """The labeled baseline: quantization-aware training with cross-entropy only, no teacher."""

    needs_teacher = False
    quantizes_student = True

    def training_step(
        self, student: nn.Module, teacher: nn.Module | None, images: Tensor, labels: Tensor | None
    ) -> StepOutput:
        logits = student(images)
        return StepOutput(logits, {"ce": F.cross_entropy(logits, labels)})


@register_method("supervised")
class Supervised(LabeledQAT):
    """Full-precision training with cross-entropy (how teachers are trained)."""

    quantizes_student = False
