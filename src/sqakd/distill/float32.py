"""Feature losses are computed in float32, also inside an autocast step (``run.precision: bf16``).

A feature loss compares two maps whose difference is far smaller than the maps: RFD's KL of two
nearly equal attention distributions, for one, is 2.2e-5 on eight 64x8x8 maps whose student
differs by noise of standard deviation 0.5, while bfloat16 keeps 8 significant bits; computed in
bfloat16 it came out as -0.030 (negative, and 1,000 times too large;
``tests/distill/test_float32_losses.py``). So the losses here run with autocast off, on
their floating inputs upcast to float32: the maps themselves are whatever the (bfloat16) forward
gave, only the loss's arithmetic is float32. The logit losses do the same
(:func:`sqakd.distill.kl.kd_kl_divergence`).

:func:`computed_in_float32` is the decorator; :func:`~sqakd.distill.register_feature_loss`
applies it to every registered loss's ``forward`` and ``pre_stage_loss``, so a new loss gets it
without asking.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

import torch
from torch import Tensor

Function = TypeVar("Function", bound=Callable[..., Any])
#: the device types whose autocast state is checked (the ones torch has autocast for)
DEVICE_TYPES: tuple[str, ...] = tuple(
    kind for kind in ("cpu", "cuda", "mps", "xpu") if torch.amp.is_autocast_available(kind)
)
REDUCED = (torch.bfloat16, torch.float16)


def upcast(value: Any) -> Any:
    """``value`` with every bfloat16/float16 tensor in it (also inside dicts, lists and tuples)
    as float32; everything else (float32 tensors, integer tensors, modules) unchanged."""
    if isinstance(value, Tensor):
        return value.float() if value.dtype in REDUCED else value
    if isinstance(value, Mapping):
        return {key: upcast(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        items = [upcast(item) for item in value]
        return type(value)(*items) if hasattr(value, "_fields") else type(value)(items)
    return value


def computed_in_float32(function: Function) -> Function:
    """Decorator: inside an autocast region, call ``function`` with autocast off and its
    arguments :func:`upcast`; outside one, call it unchanged (no copy, no cost)."""
    if getattr(function, "computed_in_float32", False):
        return function

    @functools.wraps(function)
    def in_float32(*args: Any, **kwargs: Any) -> Any:
        active = [kind for kind in DEVICE_TYPES if torch.is_autocast_enabled(kind)]
        if not active:
            return function(*args, **kwargs)
        with contextlib.ExitStack() as stack:
            for kind in active:
                stack.enter_context(torch.autocast(kind, enabled=False))
            return function(*upcast(args), **upcast(kwargs))

    in_float32.computed_in_float32 = True  # type: ignore[attr-defined]
    return in_float32  # type: ignore[return-value]
