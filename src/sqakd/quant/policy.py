"""What to quantize and how: a typed policy, validated when it is built."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from .base import MAX_BITS, MIN_BITS

FLOAT_BITS = 32


def _check_policy_bits(value: int | None) -> int | None:
    if value is None or value == FLOAT_BITS or (MIN_BITS <= value <= MAX_BITS):
        return value
    raise ValueError(
        f"bits must be {MIN_BITS}..{MAX_BITS}, or {FLOAT_BITS} to keep the layer in float; got {value}"
    )


def _check_method(value: str | None) -> str | None:
    """A registered quantizer name (checked when the policy is built, before any data loads)."""
    if value is not None:
        from .registry import quantizer_class

        quantizer_class(value)  # ValueError naming the known quantizers
    return value


class LayerOverride(BaseModel):
    """Settings for the layers whose qualified name matches a pattern (``fnmatch`` syntax)."""

    model_config = ConfigDict(extra="forbid")

    weight_bits: int | None = None
    act_bits: int | None = None
    method: str | None = None
    weight_method: str | None = None
    act_method: str | None = None

    _bits = field_validator("weight_bits", "act_bits")(_check_policy_bits)
    _methods = field_validator("method", "weight_method", "act_method")(_check_method)


class QuantPolicy(BaseModel):
    """How :func:`sqakd.quant.prepare` quantizes a model.

    Attributes:
        method: quantizer for weights and activations (see ``available_quantizers()``).
        weight_method / act_method: use a different quantizer for one role.
        weight_bits / act_bits: 1..8, or 32 for float.
        per_channel_weights: one range per output channel for weight quantizers.
        first_last: ``"float"`` keeps the first and last quantizable layers in full precision (the
            papers' convention); ``"8bit"`` quantizes them at W8A8; ``"same"`` treats them like
            every other layer.
        method_options: keyword options given to every quantizer (e.g. ``{"delta": 0.001}``).
        weight_options / act_options: options for the weight or activation quantizers only
            (e.g. ``act_options: {init_alpha: 8}`` for PACT activations with LSQ weights).
        overrides: ``{pattern: LayerOverride}``, applied in order; later patterns win. An
            ``nn.MultiheadAttention``'s projections are matched as ``<name>.q_proj``,
            ``.k_proj``, ``.v_proj`` and ``.out_proj``.
        observer: how calibration sets the ranges (see :mod:`sqakd.quant.observers`): ``native``
            (each quantizer's own initialisation), ``minmax``, ``percentile`` or ``mse``, for the
            quantizers that take a range (the others keep their own rule, named in one warning).
        observer_percentile: the percentile of ``observer: percentile``, above 50, at most 100.
        embeddings: quantize the weights of ``nn.Embedding`` layers too (their inputs are
            indices, so they get no input quantizer); off by default, embeddings stay in float.
    """

    model_config = ConfigDict(extra="forbid")

    method: str = "ewgs"
    weight_method: str | None = None
    act_method: str | None = None
    weight_bits: int = 4
    act_bits: int = 4
    per_channel_weights: bool = False
    first_last: Literal["float", "8bit", "same"] = "float"
    method_options: dict[str, Any] = {}
    weight_options: dict[str, Any] = {}
    act_options: dict[str, Any] = {}
    overrides: dict[str, LayerOverride] = {}
    observer: str = "native"
    observer_percentile: float = Field(99.99, gt=50.0, le=100.0)
    embeddings: bool = False

    _bits = field_validator("weight_bits", "act_bits")(_check_policy_bits)
    _methods = field_validator("method", "weight_method", "act_method")(_check_method)

    @field_validator("observer")
    @classmethod
    def _registered_observer(cls, value: str) -> str:
        from .observers import available_observers

        if value not in available_observers():
            raise ValueError(
                f"unknown observer {value!r}; choose one of: {', '.join(available_observers())}"
            )
        return value
