"""The teacher as a method's declared role asks for it, prepared in one place.

- ``none``: no teacher;
- ``logits``: a frozen eval-mode copy with batch norm folded (:func:`frozen_for_inference`),
  and its logits looked up instead of recomputed when ``cache_images`` is given
  (:class:`CachedTeacher`; only when training shows the same images every epoch);
- ``features``: a frozen eval-mode copy that is neither folded nor cached, so forward hooks on
  its layers fire and its batch norms (and their running statistics) exist;
- ``trainable``: a train-mode copy whose parameters require gradients (its optimizer group is
  the method's ``teacher`` group, and the trainer checkpoints it).

The caller's module is never changed: every role gets its own copy.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable

import torch
from torch import Tensor, nn

from .inference import frozen_for_inference
from .teacher_cache import CachedTeacher


def teacher_for(
    role: str,
    teacher: nn.Module | None,
    cache_images: Iterable[Tensor] | None = None,
    channels_last: bool = False,
) -> nn.Module | None:
    """``teacher`` prepared for ``role`` (see the module docstring)."""
    if role == "none":
        return None
    if teacher is None:
        raise ValueError(
            f"a method whose teacher role is {role!r} needs a teacher; set teacher.checkpoint"
        )
    if cache_images is not None and role != "logits":
        raise ValueError(
            f"teacher.cache_outputs needs a method that reads only the teacher's logits; this "
            f"method's teacher role is {role!r}: unset teacher.cache_outputs"
        )
    if role == "logits":
        prepared = frozen_for_inference(teacher)
    elif role == "features":
        prepared = copy.deepcopy(teacher).eval()
        prepared.requires_grad_(False)
    elif role == "trainable":
        prepared = copy.deepcopy(teacher).train()
        prepared.requires_grad_(True)
    else:
        raise ValueError(f"unknown teacher role {role!r}; one of none, logits, features, trainable")
    if channels_last:
        prepared = prepared.to(memory_format=torch.channels_last)
    if cache_images is not None:
        prepared = CachedTeacher(prepared, cache_images)
    return prepared


def check_teacher_role(role: str, teacher: nn.Module | None) -> None:
    """A one-line error when a teacher handed to the trainer does not fit its role (a frozen
    role in train mode or with gradients: batch-norm statistics would drift silently)."""
    if teacher is None:
        if role != "none":
            raise ValueError(f"the method's teacher role is {role!r} but no teacher was given")
        return
    if role in ("logits", "features"):
        if teacher.training or any(p.requires_grad for p in teacher.parameters()):
            raise ValueError(
                f"a {role!r} teacher must be frozen (eval mode, no gradients); prepare it with "
                "sqakd.engine.teacher_for(role, teacher)"
            )
