"""Mixed precision of a training step (``run.precision``): which float type autocast uses, where.

- ``float32``: no autocast (the default);
- ``bf16``: the method's step runs under ``torch.autocast`` with bfloat16 on the run's device
  (CPU or CUDA): the teacher's forward and the student's float parts (convolutions and matrix
  products on the quantizers' float32 grid values, batch norms) run in bfloat16;
- ``fp16``: the same with float16, CUDA only, with a gradient scaler (float16 gradients
  underflow without one).

What stays float32 whatever the setting: the quantizers' arithmetic (scale, divide, round,
clamp: :mod:`sqakd.quant.base` says why), the logit losses (logits are upcast before the
softmax, see :func:`sqakd.distill.kl.kd_kl_divergence`; autocast keeps cross-entropy and MSE in
float32 itself), the backward pass's accumulation into the float32
weights, the optimizer steps, evaluation (the deployed integer arithmetic) and the epoch hooks
(EWGS's curvature estimate), and a teacher's cached logits (``teacher.cache_outputs``: computed
once, before training). The weights and quantizer ranges are float32 throughout: autocast
casts a copy for each op, so a checkpoint is the same kind of file at any precision. The
feature losses (FAQD's affinity, the distillation zoo, AKT's RFD) compute in float32 on their
upcast maps (:mod:`sqakd.distill.float32` says why), and so do AKT's batch-norm statistics; the
maps themselves are the bfloat16 forward's.
"""

from __future__ import annotations

import contextlib
from typing import Literal

import torch

Precision = Literal["float32", "bf16", "fp16"]
PRECISIONS: tuple[str, ...] = ("float32", "bf16", "fp16")
#: the float type autocast runs in, per setting (float32: no autocast)
AUTOCAST_DTYPES: dict[str, torch.dtype] = {"bf16": torch.bfloat16, "fp16": torch.float16}


def check_precision(precision: str, device: torch.device | str) -> None:
    """A one-line ``ValueError`` for a precision the device cannot run: fp16 needs CUDA (CPU
    float16 arithmetic is emulated, slower than float32, and needs loss scaling); bf16 needs a
    device type with autocast."""
    if precision not in PRECISIONS:
        raise ValueError(f"run.precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    device_type = torch.device(device).type
    if precision == "fp16" and device_type != "cuda":
        raise ValueError(
            f"run.precision: fp16 needs a CUDA device (run.device is {device_type}); on "
            f"{device_type} use run.precision: bf16 (or float32)"
        )
    if precision == "bf16" and not torch.amp.is_autocast_available(device_type):
        raise ValueError(
            f"run.precision: bf16 needs torch.autocast, which {device_type} does not have; use "
            "run.precision: float32"
        )


def autocast(precision: str, device: torch.device | str) -> contextlib.AbstractContextManager:
    """``torch.autocast`` for ``precision`` on ``device``'s type (a no-op context for float32,
    which leaves a caller's own autocast alone)."""
    dtype = AUTOCAST_DTYPES.get(precision)
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(torch.device(device).type, dtype=dtype)


def full_precision(precision: str, device: torch.device | str) -> contextlib.AbstractContextManager:
    """Autocast off on ``device``'s type inside the block, for the backward pass and the
    optimizer steps of a step run under :func:`autocast` (PyTorch advises against a backward
    under autocast); a no-op context for float32."""
    if precision not in AUTOCAST_DTYPES:
        return contextlib.nullcontext()
    return torch.autocast(torch.device(device).type, enabled=False)


def gradient_scaler(precision: str, device: torch.device | str) -> torch.amp.GradScaler:
    """A gradient scaler, enabled only for fp16 (disabled: its calls pass through unchanged)."""
    return torch.amp.GradScaler(torch.device(device).type, enabled=precision == "fp16")


def describe_precision(precision: str) -> str:
    """One line for the run log."""
    if precision == "float32":
        return "precision float32"
    dtype = str(AUTOCAST_DTYPES[precision]).removeprefix("torch.")
    return (
        f"precision {precision} (torch.autocast: teacher and student forwards in {dtype}; "
        "quantizer rounding, losses, gradients, weights and evaluation in float32)"
    )
