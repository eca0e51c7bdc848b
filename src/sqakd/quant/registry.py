"""Quantizers by name: adding a method means adding one file with ``@register_quantizer``."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

from .base import Quantizer, Role

QuantizerClass = TypeVar("QuantizerClass", bound=type[Quantizer])

_QUANTIZERS: dict[str, type[Quantizer]] = {}


def register_quantizer(name: str) -> Callable[[QuantizerClass], QuantizerClass]:
    """Class decorator: make a :class:`Quantizer` subclass available under ``name``."""

    def add(cls: QuantizerClass) -> QuantizerClass:
        if name in _QUANTIZERS:
            raise ValueError(f"quantizer {name!r} is registered twice")
        cls.method = name
        _QUANTIZERS[name] = cls
        return cls

    return add


def available_quantizers() -> list[str]:
    """Names of every registered quantizer, sorted."""
    return sorted(_QUANTIZERS)


def quantizer_class(name: str) -> type[Quantizer]:
    try:
        return _QUANTIZERS[name]
    except KeyError:
        raise ValueError(
            f"unknown quantization method {name!r}; choose one of: {', '.join(available_quantizers())}"
        ) from None


def build_quantizer(
    name: str, bits: int, role: Role, per_channel: bool = False, **options: Any
) -> Quantizer:
    """Build the quantizer ``name`` for ``role`` ('weight' or 'activation') at ``bits`` bits.

    ``options`` are the method's own keyword arguments (for example ``delta`` for EWGS); an
    unknown option is reported with the ones the method accepts.
    """
    cls = quantizer_class(name)
    try:
        return cls(bits=bits, role=role, per_channel=per_channel, **options)
    except TypeError as error:
        if "unexpected keyword" not in str(error):
            raise
        import inspect

        accepted = [
            p
            for p in inspect.signature(cls.__init__).parameters
            if p not in ("self", "bits", "role", "per_channel")
        ]
        raise ValueError(
            f"quantizer {name!r} got an unknown option ({error}); it accepts: {', '.join(accepted) or 'none'}"
        ) from None
