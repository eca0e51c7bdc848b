"""QKD (Kim, Bhalgat, Lee, Patel, Kwak, 2019, arXiv 1911.12491): Quantization-aware Knowledge
Distillation, in three phases, with a teacher that is itself trained to suit the student.

1. ``self_studying``: the quantized student trains alone, cross-entropy only; the teacher is not
   run at all.
2. ``co_studying``: teacher and student train together on every batch, each learning from the
   other's detached logits. Student: ``CE(s, y) + T**2 KL(t || s)``; teacher (train mode, its own
   optimizer): ``CE(t, y) + T**2 KL(s || t)``.
3. ``tutoring``: the co-studied teacher is frozen (eval mode, no autograd) and the student learns
   ``CE(s, y) + T**2 KL(t || s)`` from it.

Provenance: the three phases and their order are the paper's (abstract). QKD has no official
code: the loss forms, T = 2, the unweighted sums and the 30/100/70-of-200 epoch split (CIFAR-10)
come from independent reimplementations; the teacher's learning rate (0.1 x the student's by
default) is this library's choice (reimplementations use the student's or a tiny one). All of them
are options.

``labels: false`` is this library's extension, not the paper's (QKD needs labels in every phase):
self-studying becomes distillation from the original float teacher (the trainable copy, which has
not been trained yet: it is run frozen, in eval mode and without autograd), and the cross-entropy
terms drop out of every phase, so no label is ever read.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from torch import Tensor, nn

from ..distill import kd_kl_divergence
from .base import TEACHER_GROUP, Batch, Method, Models, Needs, Phase, register_method

if TYPE_CHECKING:
    from ..config import OptimizerConfig
    from .base import DataShapes

SELF_STUDYING, CO_STUDYING, TUTORING = "self_studying", "co_studying", "tutoring"
STUDENT_GROUPS = ("weights", "quantizers")


class QKDOptions(BaseModel):
    """QKD's keys under ``method:``. Phase lengths: an integer is a number of epochs, a float
    between 0 and 1 a fraction of ``train.epochs`` (rounded half up); tutoring gets the rest."""

    model_config = ConfigDict(extra="forbid")

    self_study_epochs: int | float = 0.15  # 30 of 200 (reimplementation)
    co_study_epochs: int | float = 0.5  # 100 of 200 (reimplementation)
    temperature: float = Field(2.0, gt=0)  # reimplementations
    student_ce_weight: float = Field(1.0, ge=0)
    student_kl_weight: float = Field(1.0, ge=0)
    teacher_ce_weight: float = Field(1.0, ge=0)
    teacher_kl_weight: float = Field(1.0, ge=0)
    teacher_lr_scale: float = Field(
        0.1, gt=0
    )  # of train.weights.lr, unless train.optimizers.teacher
    labels: bool = True

    @field_validator("self_study_epochs", "co_study_epochs", mode="before")
    @classmethod
    def _epochs_or_fraction(cls, value: Any) -> Any:
        if isinstance(value, bool):
            raise ValueError(
                "give whole epochs (e.g. 30) or a fraction of train.epochs (e.g. 0.15)"
            )
        if isinstance(value, int) and value < 0:
            raise ValueError(f"{value} epochs is negative")
        if isinstance(value, float) and not 0.0 <= value <= 1.0:
            raise ValueError(
                f"{value} is neither whole epochs nor a fraction of train.epochs between 0 and 1; "
                "give whole epochs as an integer (e.g. 30)"
            )
        return value

    @model_validator(mode="after")
    def _something_to_learn(self) -> QKDOptions:
        fractions = [
            v for v in (self.self_study_epochs, self.co_study_epochs) if isinstance(v, float)
        ]
        if len(fractions) == 2 and sum(fractions) > 1:
            raise ValueError(
                f"self_study_epochs {self.self_study_epochs} + co_study_epochs "
                f"{self.co_study_epochs} exceed the whole run (1.0) by {sum(fractions) - 1:.4g}"
            )
        if not self.labels:
            for key in ("student_kl_weight", "teacher_kl_weight"):
                if getattr(self, key) == 0:
                    raise ValueError(
                        f"with labels false the KL terms are all there is to learn; {key} must be > 0"
                    )
            return self
        if self.student_ce_weight == 0 and self.self_study_epochs != 0:
            raise ValueError(
                "self-studying is cross-entropy only: student_ce_weight 0 leaves it nothing to "
                "learn; set student_ce_weight > 0 or self_study_epochs: 0"
            )
        if self.student_ce_weight == 0 and self.student_kl_weight == 0:
            raise ValueError("student_ce_weight and student_kl_weight are both 0: nothing to learn")
        if self.teacher_ce_weight == 0 and self.teacher_kl_weight == 0:
            raise ValueError("teacher_ce_weight and teacher_kl_weight are both 0: nothing to learn")
        return self


@register_method("qkd")
class QKD(Method):
    """Self-studying, co-studying with a trainable teacher, then tutoring (see the module
    docstring). The registry's display label cannot follow the options (bench and demo read it
    from the class), so it names neither variant; the tables' "labels read" column tells them
    apart."""

    label = "QKD"
    Options = QKDOptions
    options: QKDOptions

    @property
    def needs(self) -> Needs:  # type: ignore[override]
        return Needs(
            labels=self.options.labels,
            teacher="trainable",
            label_free_setting="method.labels=false",
        )

    # ------------------------------------------------------------------------ the run's shape
    def phase_epochs(self, epochs: int) -> tuple[int, int, int]:
        """Epochs of self-studying, co-studying and tutoring in a run of ``epochs``."""
        cfg = self.options

        def resolve(value: int | float) -> int:
            return value if isinstance(value, int) else math.floor(value * epochs + 0.5)

        def describe(value: int | float, resolved: int) -> str:
            return str(value) if isinstance(value, int) else f"{value} ({resolved} epochs)"

        self_study, co_study = resolve(cfg.self_study_epochs), resolve(cfg.co_study_epochs)
        over = self_study + co_study - epochs
        if over > 0:
            raise ValueError(
                f"QKD phases: self_study_epochs {describe(cfg.self_study_epochs, self_study)} + "
                f"co_study_epochs {describe(cfg.co_study_epochs, co_study)} exceed train.epochs "
                f"{epochs} by {over}; lower method.self_study_epochs or method.co_study_epochs, "
                "or raise train.epochs"
            )
        if co_study == 0:
            raise ValueError(
                f"QKD phases: co_study_epochs {describe(cfg.co_study_epochs, co_study)} of "
                f"train.epochs {epochs} leaves no co-studying (the phase that trains the teacher); "
                "raise method.co_study_epochs or train.epochs"
            )
        return self_study, co_study, epochs - self_study - co_study

    def phases(self, epochs: int) -> list[Phase]:
        """Self-studying and tutoring train the student's groups, co-studying the teacher's too;
        a phase of 0 epochs is left out."""
        self_study, co_study, tutoring = self.phase_epochs(epochs)
        plan = [
            Phase(SELF_STUDYING, self_study, trains=STUDENT_GROUPS),
            Phase(CO_STUDYING, co_study, trains=(*STUDENT_GROUPS, TEACHER_GROUP)),
            Phase(TUTORING, tutoring, trains=STUDENT_GROUPS),
        ]
        return [phase for phase in plan if phase.epochs > 0]

    def setup(self, models: Models, shapes: DataShapes) -> None:
        check_trainable(models.teacher)

    def parameter_groups(self, models: Models) -> dict[str, list[nn.Parameter]]:
        check_trainable(models.teacher)
        return super().parameter_groups(models)

    def optimizer_settings(self, group: str, default: OptimizerConfig) -> OptimizerConfig:
        """The teacher's optimizer, unless ``train.optimizers.teacher`` sets it: the student's
        weight settings at ``teacher_lr_scale`` times the learning rate."""
        if group == TEACHER_GROUP:
            return default.model_copy(update={"lr": default.lr * self.options.teacher_lr_scale})
        return default

    # ------------------------------------------------------------------------------- the step
    def losses(self, models: Models, batch: Batch, phase: Phase) -> dict[str, Tensor]:
        """Named, weighted terms: ``ce`` and ``kl`` (the student's), ``teacher_ce`` and
        ``teacher_kl`` (the teacher's, co-studying only). Each network's terms depend only on its
        own parameters (the other's logits are detached), so one backward of the sum gives each
        exactly the gradient of its own loss."""
        assert models.teacher is not None and batch.images is not None
        cfg, temperature = self.options, self.options.temperature
        labels = batch.labels if cfg.labels else None
        if cfg.labels and labels is None:
            raise ValueError("QKD with labels true got a batch without labels")
        logits = models.student(batch.images)
        losses: dict[str, Tensor] = {}
        if labels is not None and cfg.student_ce_weight > 0:
            losses["ce"] = cfg.student_ce_weight * F.cross_entropy(logits, labels)
        if phase.name == SELF_STUDYING and cfg.labels:
            return losses  # the paper's self-studying: no distillation, the teacher is not run
        if phase.name == CO_STUDYING:
            teacher_logits = models.teacher(batch.images)  # train mode, with autograd
        else:  # tutoring, or the label-free self-studying from the untrained (original) teacher
            with torch.no_grad():
                teacher_logits = models.teacher(batch.images)
        if cfg.student_kl_weight > 0:
            losses["kl"] = cfg.student_kl_weight * kd_kl_divergence(
                logits, teacher_logits.detach(), temperature
            )
        if phase.name == CO_STUDYING:
            if labels is not None and cfg.teacher_ce_weight > 0:
                losses["teacher_ce"] = cfg.teacher_ce_weight * F.cross_entropy(
                    teacher_logits, labels
                )
            if cfg.teacher_kl_weight > 0:
                losses["teacher_kl"] = cfg.teacher_kl_weight * kd_kl_divergence(
                    teacher_logits, logits.detach(), temperature
                )
        return losses


def check_trainable(teacher: nn.Module | None) -> None:
    """A one-line error when the teacher cannot be trained in co-studying."""
    if teacher is None:
        raise ValueError("QKD trains the teacher in co-studying; set teacher.checkpoint")
    if not any(p.requires_grad for p in teacher.parameters()):
        raise ValueError(
            "QKD trains the teacher in co-studying, but none of its parameters requires "
            "gradients; prepare it with sqakd.engine.teacher_for('trainable', teacher)"
        )
