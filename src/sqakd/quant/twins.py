"""Which quantized twin replaces which float layer (what :func:`sqakd.quant.prepare` swaps)."""

from __future__ import annotations

from torch import nn

from .attention import QuantMultiheadAttention
from .float64_sums import Float64SumConv
from .layers import (
    QuantConv1d,
    QuantConv2d,
    QuantConv3d,
    QuantConvTranspose1d,
    QuantConvTranspose2d,
    QuantEmbedding,
    QuantizedLayer,
    QuantLinear,
)

#: float layer type -> its quantized twin; prepare() swaps these and their subclasses that
#: keep the parent's forward (see :func:`twin_for`). ``nn.Embedding`` only when asked
#: (``quant.embeddings``); an attention's twin quantizes its four projections.
QUANTIZED_TWINS: dict[type[nn.Module], type[nn.Module]] = {
    nn.Conv1d: QuantConv1d,
    nn.Conv2d: QuantConv2d,
    nn.Conv3d: QuantConv3d,
    nn.ConvTranspose1d: QuantConvTranspose1d,
    nn.ConvTranspose2d: QuantConvTranspose2d,
    nn.Linear: QuantLinear,
    nn.Embedding: QuantEmbedding,
    nn.MultiheadAttention: QuantMultiheadAttention,
}

#: methods a subclass must not override for its parent's quantized twin to compute what it does
_FORWARD_METHODS = ("forward", "_conv_forward")


def twin_for(module: nn.Module, embeddings: bool = False) -> tuple[type[nn.Module] | None, str]:
    """``(twin, "")`` for a layer prepare() can swap: one of :data:`QUANTIZED_TWINS`' float
    types, or a subclass of one that keeps its parent's forward (timm-style subclasses that only
    add a constructor); ``(None, reason)`` for a layer kept in float on purpose: a subclass with
    its own forward, an embedding unless ``embeddings``, one that renormalises its rows or
    takes sparse gradients. ``(None, "")`` for everything else."""
    if isinstance(module, (QuantizedLayer, QuantMultiheadAttention, Float64SumConv)):
        return None, ""
    float_type = next((t for t in QUANTIZED_TWINS if type(module) is t), None)
    if float_type is None:
        float_type = next((t for t in QUANTIZED_TWINS if isinstance(module, t)), None)
    if float_type is None:
        return None, ""
    own = [
        name
        for name in _FORWARD_METHODS
        if hasattr(float_type, name)
        and getattr(type(module), name) is not getattr(float_type, name)
    ]
    if own:
        return None, (
            f"subclass of nn.{float_type.__name__} with its own {own[0]}(), kept in float; "
            f"quantize it by giving it nn.{float_type.__name__}'s forward"
        )
    if isinstance(module, nn.Embedding):
        reason = _embedding_kept(module, embeddings)
        if reason:
            return None, reason
    return QUANTIZED_TWINS[float_type], ""


def _embedding_kept(embedding: nn.Embedding, embeddings: bool) -> str:
    """Why an embedding stays in float ("" when it is quantized)."""
    if embedding.max_norm is not None:
        return "nn.Embedding with max_norm renormalises its rows in place; kept in float"
    if embedding.sparse:
        return "nn.Embedding with sparse gradients; kept in float"
    if not embeddings:
        return (
            "nn.Embedding is a lookup table, kept in float by default; quant.embeddings: true "
            "quantizes its weights"
        )
    return ""
