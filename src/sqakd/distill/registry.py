"""Distillation losses by name: a loss is an nn.Module called as ``loss(student_logits, teacher_logits)``."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

from torch import nn

LossClass = TypeVar("LossClass", bound=type[nn.Module])
_LOSSES: dict[str, type[nn.Module]] = {}


def register_loss(name: str) -> Callable[[LossClass], LossClass]:
    def add(cls: LossClass) -> LossClass:
        if name in _LOSSES:
            raise ValueError(f"loss {name!r} is registered twice")
        _LOSSES[name] = cls
        return cls

    return add


def available_losses() -> list[str]:
    return sorted(_LOSSES)


def build_loss(name: str, **options: Any) -> nn.Module:
    """Build the registered loss ``name``; an unknown name lists the known ones."""
    try:
        cls = _LOSSES[name]
    except KeyError:
        raise ValueError(
            f"unknown loss {name!r}; choose one of: {', '.join(available_losses())}"
        ) from None
    return cls(**options)
