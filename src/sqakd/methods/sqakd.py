"""SQAKD (Zhao & Zhao, AISTATS 2024): QAT as self-supervised distillation from the float teacher.

loss = alpha * T**2 * KL(teacher || student) + gamma * CE(student, labels) + beta * extra_loss

Defaults (released code): T = 4, alpha = 1, gamma = 0, beta = 0, so no label is ever read.
The quantizers' own gradient rules act on the discretisation error; the teacher is frozen, only
its logits are read (so the run may fold its batch norms and cache its logits), and it runs
without autograd. Also here: the two baselines that need no teacher, labeled QAT and
full-precision training.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from torch import Tensor

from ..distill import available_losses, build_loss, kd_kl_divergence
from .base import Batch, Method, Models, Needs, Phase, register_method


class SQAKDOptions(BaseModel):
    """SQAKD's keys under ``method:``."""

    model_config = ConfigDict(extra="forbid")

    temperature: float = Field(4.0, gt=0)
    #: the logits' class axis: 1 for (N, C) and (N, C, H, W), -1 for (N, T, V) sequences; the
    #: losses average over every other position (per image, pixel or token)
    class_dim: int = 1
    alpha: float = Field(1.0, ge=0)
    gamma: float = Field(0.0, ge=0)
    beta: float = Field(0.0, ge=0)
    extra_loss: str | None = None

    @model_validator(mode="after")
    def _something_to_train(self) -> SQAKDOptions:
        if self.alpha == 0 and self.gamma == 0 and self.beta == 0:
            raise ValueError(
                "alpha, gamma and beta are all 0: nothing to train; set method.alpha: 1"
            )
        if self.beta > 0 and not self.extra_loss:
            raise ValueError(
                "beta > 0 needs method.extra_loss (a registered loss name, e.g. logit_mse)"
            )
        return self

    @field_validator("extra_loss")
    @classmethod
    def _registered(cls, name: str | None) -> str | None:
        if name is not None and name not in available_losses():
            raise ValueError(
                f"{name!r} is not a registered loss; choose one of: {', '.join(available_losses())}"
            )
        return name


@register_method("sqakd")
class SQAKD(Method):
    label = "SQAKD (no labels)"
    Options = SQAKDOptions
    options: SQAKDOptions

    def __init__(self, options: SQAKDOptions | None = None) -> None:
        super().__init__(options)
        cfg = self.options
        self.extra_loss = build_loss(cfg.extra_loss) if cfg.beta > 0 and cfg.extra_loss else None

    @property
    def needs(self) -> Needs:  # type: ignore[override]
        return Needs(
            labels=self.options.gamma > 0, teacher="logits", label_free_setting="method.gamma=0"
        )

    def losses(self, models: Models, batch: Batch, phase: Phase) -> dict[str, Tensor]:
        assert models.teacher is not None and batch.images is not None
        with torch.inference_mode():  # no autograd bookkeeping at all for the frozen teacher
            teacher_logits = models.teacher(batch.images)
        teacher_logits = teacher_logits.clone()  # a normal tensor autograd may save (tiny: logits)
        logits = models.student(batch.images)
        cfg = self.options
        losses: dict[str, Tensor] = {}
        if cfg.alpha > 0:
            losses["kd"] = cfg.alpha * kd_kl_divergence(
                logits, teacher_logits, cfg.temperature, cfg.class_dim
            )
        if cfg.gamma > 0:
            class_first = logits.movedim(cfg.class_dim, 1) if logits.dim() > 2 else logits
            losses["ce"] = cfg.gamma * F.cross_entropy(class_first, batch.labels)
        if self.extra_loss is not None:
            losses[cfg.extra_loss or "extra"] = cfg.beta * self.extra_loss(logits, teacher_logits)
        return losses


@register_method("qat")
class LabeledQAT(Method):
    """The labeled baseline: quantization-aware training with cross-entropy only, no teacher."""

    label = "QAT (CE, labels)"
    needs = Needs(labels=True, teacher="none")

    def losses(self, models: Models, batch: Batch, phase: Phase) -> dict[str, Tensor]:
        return {"ce": F.cross_entropy(models.student(batch.images), batch.labels)}


@register_method("supervised")
class Supervised(LabeledQAT):
    """Full-precision training with cross-entropy (how teachers are trained)."""

    label = "float (CE, labels)"
    needs = Needs(labels=True, teacher="none", quantized_student=False)
