"""Feature losses by name (the distillation zoo), apart from the logit-loss registry.

A feature loss is a :class:`FeatureLoss` subclass registered with
``@register_feature_loss("name")``. It declares, before anything is built:

- ``weight``: its default weight, the one the released SQAKD Table-7 scripts use;
- ``reads``: which features it is called on (:data:`READS`): ``"stages"`` (every tapped stage
  output), ``"last"`` (the last of them), ``"middle"`` (the middle one), ``"chain"`` (the input
  of the first stage, then every stage output: consecutive pairs), ``"embedding"`` (the input of
  the classifier, ``[B, D]``) or ``"logits"`` (the key ``"logits"``);
- ``needs_index`` and :meth:`FeatureLoss.needs_labels`: whether a batch must carry each sample's
  index, and (given the run's label setting and the loss's options) its labels;
- ``pre_epochs`` / ``pre_trains`` / ``main_stage``: a two-stage loss (FSP, FT) has a pre-stage of
  ``pre_epochs`` epochs (released: 30) that trains ``"student"`` (the student's weights and
  quantizers) or ``"own"`` (its own :meth:`FeatureLoss.pre_stage_modules`), and ``main_stage``
  says whether it still acts afterwards.

It is sized by :meth:`FeatureLoss.build` from probed feature shapes ``{key: shape without the
batch dimension}`` (probe the teacher: the student is not calibrated at setup time), called as
``loss(student_features, teacher_features, index=..., labels=...)`` on dicts with the same keys,
and returns one weight-free scalar (the caller multiplies by the weight). Registration makes
``forward`` and ``pre_stage_loss`` compute in float32 inside an autocast step
(:mod:`sqakd.distill.float32`). Everything it builds
(adapters, embeddings, memory banks, counters) is a submodule or buffer, so that checkpoints
restore it. State that must change only on a real training step (CRD's memory bank) is staged by
``forward`` and applied by :meth:`FeatureLoss.after_update`, which the method calls after the
optimizer step, so that measuring a loss (an epoch hook) changes nothing.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, Literal, TypeVar

import torch
from torch import Tensor, nn

from ._features import matching_taps
from .float32 import computed_in_float32

Reads = Literal["stages", "last", "middle", "chain", "embedding", "logits"]
READS: tuple[str, ...] = ("stages", "last", "middle", "chain", "embedding", "logits")
Shapes = Mapping[str, tuple[int, ...]]


@dataclass(frozen=True)
class BuildContext:
    """What a feature loss may size itself by besides feature shapes: the number of training
    samples (CRD's memory banks), the number of classes, whether the run reads labels, and the
    temperature of the run's logit KL."""

    train_size: int = 0
    num_classes: int = 0
    labels: bool = False
    temperature: float = 4.0


class FeatureLoss(nn.Module):
    """Base class of the registered feature losses (see the module docstring)."""

    name: ClassVar[str] = ""
    weight: ClassVar[float] = 1.0
    reads: ClassVar[Reads] = "stages"
    needs_index: ClassVar[bool] = False
    pre_epochs: ClassVar[int] = 0
    pre_trains: ClassVar[Literal["student", "own"] | None] = None
    main_stage: ClassVar[bool] = True
    #: the parameter group of the pre-stage's own modules, and its optimizer settings (keys of
    #: the recipe's optimizer section) when the recipe does not configure the group
    pre_group: ClassVar[str] = "pre_stage"
    pre_optimizer: ClassVar[dict[str, Any]] = {}
    #: the options a recipe may set (``method.loss_options.<name>``), keywords of :meth:`build`;
    #: a two-stage loss also takes ``pre_epochs`` (read by the method, not passed to ``build``)
    option_names: ClassVar[tuple[str, ...]] = ()

    @classmethod
    def needs_labels(cls, labels: bool, **options: Any) -> bool:
        """Whether the loss reads labels, given whether the run reads them and its options."""
        return False

    @classmethod
    def build(
        cls, student_shapes: Shapes, teacher_shapes: Shapes, context: BuildContext, **options: Any
    ) -> FeatureLoss:
        """The loss sized for these feature shapes (``{key: shape without batch}``)."""
        return cls(**options)

    def extra_repr(self) -> str:
        return f"weight={self.weight}, reads={self.reads!r}"

    def forward(
        self,
        student_features: Mapping[str, Tensor],
        teacher_features: Mapping[str, Tensor],
        *,
        index: Tensor | None = None,
        labels: Tensor | None = None,
    ) -> Tensor:
        raise NotImplementedError

    def pre_stage_loss(
        self, student_features: Mapping[str, Tensor] | None, teacher_features: Mapping[str, Tensor]
    ) -> Tensor:
        """The loss of the pre-stage (two-stage losses only)."""
        raise NotImplementedError(f"feature loss {self.name!r} has no pre-stage")

    def pre_stage_modules(self) -> list[nn.Module]:
        """Modules trained only in the pre-stage and frozen afterwards (``pre_trains="own"``)."""
        return []

    def after_update(self) -> None:
        """Apply state staged by the last ``forward`` (called after each optimizer step)."""


class TapwiseLoss(FeatureLoss):
    """A feature loss that is the sum over taps of one function of each (student map, teacher
    map) pair: a subclass writes only :meth:`pair`."""

    def pair(self, student_map: Tensor, teacher_map: Tensor) -> Tensor:
        raise NotImplementedError

    def forward(
        self,
        student_features: Mapping[str, Tensor],
        teacher_features: Mapping[str, Tensor],
        *,
        index: Tensor | None = None,
        labels: Tensor | None = None,
    ) -> Tensor:
        taps = matching_taps(student_features, teacher_features)
        return torch.stack(
            [self.pair(student_features[k], teacher_features[k]) for k in taps]
        ).sum()


FeatureLossClass = TypeVar("FeatureLossClass", bound=type[FeatureLoss])
_FEATURE_LOSSES: dict[str, type[FeatureLoss]] = {}


def register_feature_loss(name: str) -> Callable[[FeatureLossClass], FeatureLossClass]:
    def add(cls: FeatureLossClass) -> FeatureLossClass:
        if name in _FEATURE_LOSSES:
            raise ValueError(f"feature loss {name!r} is registered twice")
        if cls.reads not in READS:
            raise ValueError(f"feature loss {name!r} reads {cls.reads!r}, not one of {READS}")
        cls.name = name
        for method in ("forward", "pre_stage_loss"):  # arithmetic in float32 under autocast
            setattr(cls, method, computed_in_float32(getattr(cls, method)))
        _FEATURE_LOSSES[name] = cls
        return cls

    return add


def available_feature_losses() -> list[str]:
    return sorted(_FEATURE_LOSSES)


def feature_loss_class(name: str) -> type[FeatureLoss]:
    """The registered feature loss ``name``; an unknown name lists the registered ones."""
    try:
        return _FEATURE_LOSSES[name]
    except KeyError:
        raise ValueError(
            f"unknown feature loss {name!r}; choose one of: {', '.join(available_feature_losses())}"
        ) from None


def build_feature_loss(
    name: str,
    student_shapes: Shapes,
    teacher_shapes: Shapes,
    context: BuildContext | None = None,
    **options: Any,
) -> FeatureLoss:
    """Build the registered feature loss ``name``; unknown options are a one-line error."""
    cls = feature_loss_class(name)
    check_options(name, options)
    return cls.build(student_shapes, teacher_shapes, context or BuildContext(), **options)


def check_options(name: str, options: Mapping[str, Any]) -> None:
    """One-line error for an option the feature loss ``name`` does not take."""
    cls = feature_loss_class(name)
    known = (*cls.option_names, *(("pre_epochs",) if cls.pre_epochs else ()))
    unknown = [key for key in options if key not in known]
    if unknown:
        raise ValueError(
            f"feature loss {name!r} has no option {unknown[0]!r}; its options are: "
            f"{', '.join(known) or 'none'}"
        )
