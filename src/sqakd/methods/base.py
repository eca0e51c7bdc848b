"""The shape of a training method: one step that returns logits and named losses (mdistiller style)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from torch import Tensor, nn

from ..config import MethodConfig


@dataclass
class StepOutput:
    """What one training step produced: the student's logits and each named loss term."""

    logits: Tensor
    losses: dict[str, Tensor] = field(default_factory=dict)

    @property
    def total(self) -> Tensor:
        return sum(self.losses.values())  # type: ignore[return-value]


class Method(nn.Module):
    """A training recipe. Subclasses set the class flags and implement :meth:`training_step`.

    Flags:
        needs_labels: the loader must give labels (False: labels are never read).
        needs_teacher: a full-precision teacher checkpoint is required.
        quantizes_student: the student is prepared with the quant policy.
    A method's own state (phase, generator, ...) lives in its ``state_dict`` so that resume
    restores it with everything else.
    """

    needs_labels: bool = True
    needs_teacher: bool = False
    quantizes_student: bool = True

    def __init__(self, config: MethodConfig) -> None:
        super().__init__()
        self.config = config

    def training_step(
        self, student: nn.Module, teacher: nn.Module | None, images: Tensor, labels: Tensor | None
    ) -> StepOutput:
        raise NotImplementedError


MethodClass = TypeVar("MethodClass", bound=type[Method])
_METHODS: dict[str, type[Method]] = {}


def register_method(name: str) -> Callable[[MethodClass], MethodClass]:
    def add(cls: MethodClass) -> MethodClass:
        if name in _METHODS:
            raise ValueError(f"method {name!r} is registered twice")
        _METHODS[name] = cls
        return cls

    return add


def available_methods() -> list[str]:
    return sorted(_METHODS)


def method_class(name: str) -> type[Method]:
    try:
        return _METHODS[name]
    except KeyError:
        raise ValueError(
            f"unknown training method {name!r}; choose one of: {', '.join(available_methods())}"
        ) from None


def build_method(config: MethodConfig, **extra: Any) -> Method:
    return method_class(config.name)(config, **extra)
