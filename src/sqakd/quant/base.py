"""The one quantizer interface every QAT method implements.

A quantizer is an ``nn.Module`` that maps a float tensor to its fake-quantized version. All the
methods we support share one shape (the SQAKD paper's observation):

    clip -> normalise -> round to 2**bits levels -> rescale

and differ in (a) how the range is parametrised and initialised and (b) the gradient rule used
for the rounding. A subclass implements :meth:`Quantizer.initialize` (data-driven range set-up,
run once on the first tensor it sees) and :meth:`Quantizer.quantize` (the forward, with its own
backward rule), and reports the integer grid it uses through :meth:`Quantizer.grid` so that export
needs no per-method special case.

Mixed precision (``run.precision: bf16``, ``torch.autocast``): the quantization arithmetic always
runs in float32. :meth:`Quantizer.forward` turns autocast off and upcasts a bfloat16 or float16
input, so that the range and scale (``upper - lower``, a step size), the division by the scale,
the rounding, the clamp and the rescale, and the gradient rule's terms (EWGS's ``x_n - x_q``,
LSQ's step-size gradient) are all float32; its output is float32. Why: bfloat16 keeps 8
significant bits, so ``x / scale`` near 15 (a 4-bit grid) is off by up to 1/32 of a grid step and
every value that close to a rounding boundary would round to the other grid point; near 255 (8
bits) bfloat16 cannot even hold the halves, so rounding would be decided by the cast. The
weights, the ranges and their optimizer state stay float32 too (a model cast to bfloat16 is
refused by ``prepare`` and ``calibrate``: :func:`refuse_reduced_floats`). What autocast runs in
bfloat16 is the float part around the grid: the layer's convolution or matrix product on the
float32 grid values, batch norm and the rest of the network.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import torch
from torch import Tensor, nn

from .grid import CONTAINERS, QuantGrid, activation_form, broadcast_channels
from .integer_sums import IntegerInput

Role = Literal["weight", "activation"]
#: how a quantizer takes a range from an observer (:mod:`sqakd.quant.observers`): ``symmetric``
#: clips to ``[-c, c]``, ``unsigned`` to ``[0, c]``, ``asymmetric`` to ``[low, high]``
RangeKind = Literal["symmetric", "unsigned", "asymmetric"]
#: an observer: ``(quantizer, tensor) -> (low, high)``, 0-d or per channel
Observer = Callable[["Quantizer", Tensor], tuple[Tensor, Tensor]]
MIN_BITS, MAX_BITS = 1, 8
#: the float types of mixed precision, in which no quantization arithmetic runs
REDUCED_FLOATS = (torch.bfloat16, torch.float16)


def refuse_reduced_floats(dtype: torch.dtype, what: str) -> None:
    """A one-line ``ValueError`` when ``what`` (e.g. "the model's parameter 'conv1.weight'") is
    bfloat16 or float16: fake quantization runs in float32 (the module docstring says why)."""
    if dtype in REDUCED_FLOATS:
        raise ValueError(
            f"{what} is {dtype}, but fake quantization needs float32 (rounding x / scale in "
            f"{str(dtype).removeprefix('torch.')} moves values to other grid points): keep the "
            "model and its inputs float32 (model.float()) and train with run.precision: bf16 "
            "(torch.autocast), which keeps the quantizers in float32"
        )


def refuse_reduced_float_model(model: nn.Module, caller: str) -> None:
    """:func:`refuse_reduced_floats` for the first bfloat16/float16 parameter of ``model``."""
    for name, parameter in model.named_parameters():
        refuse_reduced_floats(parameter.dtype, f"{caller}: the model's parameter {name!r}")


def check_bits(bits: int) -> int:
    """Return ``bits`` if it is a whole number in 1..8, else raise a ``ValueError`` with the fix."""
    if isinstance(bits, bool) or not isinstance(bits, int) or not MIN_BITS <= bits <= MAX_BITS:
        raise ValueError(
            f"bits must be a whole number from {MIN_BITS} to {MAX_BITS}, got {bits!r}; "
            f"use 32 in a layer policy to keep a layer in float"
        )
    return bits


def per_channel_reduce(x: Tensor, axis: int, fn: str) -> Tensor:
    """Reduce every dimension but ``axis`` with ``fn`` ('amin', 'amax', 'mean', 'std', 'absmean')."""
    flat = x.detach().movedim(axis, 0).reshape(x.shape[axis], -1)
    if fn == "absmean":
        return flat.abs().mean(dim=1)
    if fn == "std":
        return flat.std(dim=1)
    return getattr(flat, fn)(dim=1)


class Quantizer(nn.Module):
    """Base class: validation, one-time data-driven initialisation, and the grid contract.

    Args:
        bits: bit-width, 1..8.
        role: ``"weight"`` or ``"activation"``; decides signedness defaults and what may be
            per-channel.
        per_channel: one range per output channel (weights only; channel axis 0).
        signed: whether the grid is symmetric around zero. ``None`` picks the method's default
            for the role.
    """

    #: registry name, set by :func:`sqakd.quant.registry.register_quantizer`
    method: str = "base"
    #: True for methods whose levels are equally spaced (export as QuantizeLinear/DequantizeLinear)
    uniform: bool = True
    #: run the method's fused kernel through ``torch.compile`` (EWGS/STE, LSQ/LSQ+, DSQ; the
    #: others have one way only). Set per model by ``prepare(..., compiled_kernels=...)`` or
    #: :func:`sqakd.quant.set_compiled_kernels`; not part of the ``state_dict``.
    compiled_kernels: bool = False
    #: sets the range at initialisation in place of :meth:`initialize`'s own rule (``None``: the
    #: method's own); set by :func:`~sqakd.quant.prepare` from ``QuantPolicy.observer``, only on
    #: quantizers with a :attr:`range_kind`. Not part of the ``state_dict``.
    observer: Observer | None = None

    def __init__(
        self,
        bits: int,
        role: Role = "weight",
        per_channel: bool = False,
        signed: bool | None = None,
    ) -> None:
        super().__init__()
        self.bits = check_bits(bits)
        if role not in ("weight", "activation"):
            raise ValueError(f"role must be 'weight' or 'activation', got {role!r}")
        if per_channel and role == "activation":
            raise ValueError(
                "per-channel ranges are for weights only; set per_channel: false for activations"
            )
        self.role: Role = role
        self.per_channel = per_channel
        self.signed = (role == "weight") if signed is None else signed
        self.channel_axis = 0
        # A buffer (not a Python flag) so that state_dict round trips keep the initialised state.
        self.register_buffer("initialized", torch.tensor(False))

    # ----------------------------------------------------------------- what subclasses implement
    def initialize(self, x: Tensor) -> None:
        """Set the range parameters from the first tensor seen (no gradient). Default: nothing."""

    def quantize(self, x: Tensor) -> Tensor:
        """The fake-quantized forward, carrying the method's gradient rule."""
        raise NotImplementedError

    @property
    def range_kind(self) -> RangeKind | None:
        """How :meth:`set_range` reads a range, or ``None`` for a quantizer that takes none (a
        fixed range, one recomputed at every forward, non-uniform levels). Default: ``None``."""
        return None

    def set_range(self, low: Tensor, high: Tensor) -> None:
        """Set the range parameters so that the grid spans ``[low, high]`` (0-d, or ``(C,)`` per
        channel; ``low = -high`` for a symmetric kind, ``0`` for an unsigned one). Implemented by
        the quantizers with a :attr:`range_kind`."""
        raise NotImplementedError(f"quantizer {self.method!r} takes no range")

    def grid(self) -> QuantGrid:
        """The integer grid currently in use (after initialisation)."""
        raise NotImplementedError

    def match_output(self, float_output: Tensor, quantized_output: Tensor) -> None:
        """Hook run once by the quantized layer after initialisation, with the layer's float and
        quantized outputs on the first batch (EWGS sets its output scale here). Default: nothing."""

    def codes(self, x: Tensor) -> Tensor:
        """Integer codes of ``x`` on :meth:`grid`, such that ``grid().dequantize(codes(x))``
        equals ``forward(x)`` (up to float rounding). Used to export and pack weights."""
        grid = self.grid()
        axis = self.channel_axis if grid.input_scale.dim() > 0 else 0
        scale = broadcast_channels(grid.input_scale, x, axis)
        zero_point = broadcast_channels(grid.input_zero_point, x, axis)
        return torch.clamp(torch.round(x / scale + zero_point), grid.qmin, grid.qmax)

    # ------------------------------------------------------------------------------ shared logic
    @property
    def levels_count(self) -> int:
        return 2**self.bits

    @property
    def is_initialized(self) -> bool:
        return bool(self.initialized)

    @torch.no_grad()
    def calibrate(self, x: Tensor) -> None:
        """Initialise the range from data now (normally done on the first forward): the method's
        own :meth:`initialize`, then, with an :attr:`observer`, the observer's range."""
        x = x.detach()
        self.initialize(x)
        if self.observer is not None and self.range_kind is not None:
            self.set_range(*self.observer(self, x))
        self.initialized.fill_(True)

    def forward(self, x: Tensor) -> Tensor:
        """``x`` fake-quantized; under autocast, with autocast off and ``x`` upcast to float32
        (the module docstring says why)."""
        if torch.is_autocast_enabled(x.device.type):
            with torch.autocast(x.device.type, enabled=False):
                return self._forward(x.float() if x.dtype in REDUCED_FLOATS else x)
        if x.dtype in REDUCED_FLOATS:  # (no message built on the hot path)
            refuse_reduced_floats(x.dtype, f"the input of a {self.method!r} quantizer")
        return self._forward(x)

    def _forward(self, x: Tensor) -> Tensor:
        if not self.is_initialized:
            self.calibrate(x)
        if self.role == "activation" and not self.training and not torch.is_grad_enabled():
            deployed = self.deployed_forward(x)
            if deployed is not None:
                return deployed
        return self.quantize(x)

    @torch.no_grad()
    def deployed_integer(self, x: Tensor) -> IntegerInput | None:
        """:meth:`deployed_forward` as ``codes * scale + shift``: the activation codes minus the
        output zero point's integer part (integer-valued floats), the output scale and the float
        shift of a fractional output zero point (0.0 when it is whole); ``None`` without a
        uniform per-tensor grid."""
        deployed = self._deployed_codes(x)
        if deployed is None:
            return None
        form, centred = deployed
        return IntegerInput(centred, form.dq_scale, form.post_shift)

    @torch.no_grad()
    def deployed_forward(self, x: Tensor) -> Tensor | None:
        """The activation as the exported model computes it, operation for operation:
        ``clip(x + shift) -> QuantizeLinear -> DequantizeLinear (+ shift)`` (see
        :func:`sqakd.quant.grid.activation_form`), or ``None`` for a grid with no such form
        (non-uniform, per channel). Inference (eval mode, no autograd) uses it, so that PyTorch
        and ONNX Runtime agree bit for bit on the codes: the method's own formula (``x * n / w +
        b`` for EWGS, say) gives the same codes except where rounding one way or the other
        decides a tie, and a deep low-bit network can amplify those few differences."""
        deployed = self._deployed_codes(x)
        if deployed is None:
            return None
        form, centred = deployed
        out = centred * form.dq_scale
        return out + form.post_shift if form.post_shift else out

    def _deployed_codes(self, x: Tensor):  # type: ignore[no-untyped-def]
        """``(form, q - z)``: the grid's activation form and ``clamp(round(clip(x + shift) /
        scale) + zero point) - output zero point``, as ``QuantizeLinear`` and
        ``DequantizeLinear`` compute the codes; ``None`` for a grid with no such form."""
        form = activation_form(self.grid())
        if isinstance(form, str):
            return None
        lowest, highest, _ = CONTAINERS[form.container]
        if form.pre_shift:
            x = x + form.pre_shift
        if form.clip is not None:
            x = torch.clamp(x, form.clip[0], form.clip[1])
        codes = torch.clamp(
            torch.round(x / form.q_scale) + form.q_zero_point.float(), lowest, highest
        )
        return form, codes - form.dq_zero_point.float()

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:  # type: ignore[override]
        """A per-channel range is 0-d until initialisation gives it shape (C,): adopt the stored
        (C,) shape so that a fresh quantizer loads a trained one's ``state_dict``."""
        if self.per_channel:
            for name, tensor in [*self._parameters.items(), *self._buffers.items()]:
                stored = state_dict.get(prefix + name)
                if (
                    tensor is not None
                    and stored is not None
                    and tensor.dim() == 0
                    and stored.dim() == 1
                ):
                    tensor.data = torch.empty(
                        stored.shape, dtype=tensor.dtype, device=tensor.device
                    )
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def extra_repr(self) -> str:
        kind = "per-channel" if self.per_channel else "per-tensor"
        sign = "signed" if self.signed else "unsigned"
        return f"method={self.method}, bits={self.bits}, role={self.role}, {kind}, {sign}"

    def _range_shape(self, x_shape: torch.Size | None = None) -> tuple[int, ...]:
        """Shape of a range parameter: () per tensor, (C,) per channel."""
        if not self.per_channel:
            return ()
        if x_shape is None:
            raise ValueError("per-channel range needs the tensor shape")
        return (x_shape[self.channel_axis],)


def round_ste(x: Tensor) -> Tensor:
    """``round`` in the forward, identity gradient in the backward (the straight-through estimator).

    Written as ``round(x) + (x - x.detach())`` so the forward is exactly ``round(x)``."""
    return torch.round(x).detach() + (x - x.detach())


def scale_gradient(x: Tensor, factor: float) -> Tensor:
    """Identity in the forward (exactly ``x``); multiplies the gradient by ``factor`` (LSQ's
    gradient scale)."""
    scaled = x * factor
    return x.detach() + (scaled - scaled.detach())
