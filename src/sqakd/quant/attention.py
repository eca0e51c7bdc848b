"""The quantized twin of ``nn.MultiheadAttention``: its four projections quantized, the attention
itself (scores, masks, softmax) in float.

``nn.MultiheadAttention`` never calls its projections as modules: the query, key and value
projections are rows of one packed ``in_proj_weight`` (or three ``q/k/v_proj_weight`` when
``kdim``/``vdim`` differ), and ``F.multi_head_attention_forward`` reads even ``out_proj.weight``
directly. :class:`QuantMultiheadAttention` keeps those parameters where they are, so its
``state_dict`` has ``nn.MultiheadAttention``'s names (plus the quantizers' keys, as every
quantized layer), and calls four quantized layers instead:

- ``q_proj``, ``k_proj``, ``v_proj``: :class:`AttentionProjection`, a quantized linear layer
  whose weight and bias are views of the attention's own parameters (its third of
  ``in_proj_weight`` and ``in_proj_bias``, or ``q_proj_weight``...);
- ``out_proj``: a :class:`~sqakd.quant.layers.QuantLinear` sharing ``out_proj``'s parameters.

Each is a :class:`~sqakd.quant.layers.QuantizedLayer`: weight and input quantizers, calibration
on the first batch, integer sums in inference, export, packing. Between them :func:`attend`
computes what ``F.multi_head_attention_forward`` computes between its projections (bias_k/v,
zero attention, key padding and attention masks, dropout, averaged or per-head weights), op for
op. With quantization off the twin is ``nn.MultiheadAttention.forward`` itself.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .base import Quantizer
from .layers import QuantizedLayer, QuantLinear

#: the quantized projections, in the order the attention uses them
INPUT_PROJECTIONS = ("q_proj", "k_proj", "v_proj")
PROJECTIONS = (*INPUT_PROJECTIONS, "out_proj")
#: nn.MultiheadAttention's separate weights (``kdim``/``vdim`` other than ``embed_dim``)
_SEPARATE_WEIGHTS = ("q_proj_weight", "k_proj_weight", "v_proj_weight")

QuantizerPair = tuple[Quantizer | None, Quantizer | None]


def projection_shapes(attention: nn.MultiheadAttention) -> dict[str, tuple[int, ...]]:
    """Projection name -> its weight's shape ``(out, in)``."""
    embed = attention.embed_dim
    return {
        "q_proj": (embed, embed),
        "k_proj": (embed, attention.kdim),
        "v_proj": (embed, attention.vdim),
        "out_proj": tuple(attention.out_proj.weight.shape),
    }


class AttentionProjection(QuantizedLayer):
    """The query (``index`` 0), key (1) or value (2) projection of ``owner``, a quantized linear
    layer. Its ``weight`` and ``bias`` are views of the owner's parameters, read at each use:
    they hold no parameter of their own, so the owner's ``state_dict`` names stay as they are,
    an optimizer step on ``in_proj_weight`` reaches them, and their version counter (shared
    with the owner's parameter) invalidates the cached deployed weight."""

    def __init__(
        self,
        owner: nn.MultiheadAttention,
        index: int,
        weight_quantizer: Quantizer | None = None,
        act_quantizer: Quantizer | None = None,
    ) -> None:
        super().__init__()
        object.__setattr__(self, "_owner", owner)  # not a submodule: no cycle in the tree
        self.index = index
        self._init_quantizers(weight_quantizer, act_quantizer)

    @property
    def weight(self) -> Tensor:  # type: ignore[override]
        owner = self._owner
        if owner.in_proj_weight is None:
            return getattr(owner, _SEPARATE_WEIGHTS[self.index])
        embed = owner.embed_dim
        return owner.in_proj_weight.narrow(0, self.index * embed, embed)

    @property
    def bias(self) -> Tensor | None:
        bias = self._owner.in_proj_bias
        embed = self._owner.embed_dim
        return None if bias is None else bias.narrow(0, self.index * embed, embed)

    def weight_key(self, name: str) -> str:
        owner = name.rpartition(".")[0]
        parameter = "in_proj_weight"
        if self._owner.in_proj_weight is None:
            parameter = _SEPARATE_WEIGHTS[self.index]
        return f"{owner}.{parameter}" if owner else parameter

    def _float_op(self, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        return F.linear(x, weight, bias)

    def _window_sums(self, x: Tensor) -> Tensor:
        return F.linear(x, self.window_kernel())

    def extra_repr(self) -> str:
        out_features, in_features = self.weight.shape
        source = "in_proj_weight" if self._owner.in_proj_weight is not None else "q/k/v_proj_weight"
        return (
            f"{INPUT_PROJECTIONS[self.index]}, in_features={in_features}, "
            f"out_features={out_features}, weight from {source}"
        )


class QuantMultiheadAttention(nn.MultiheadAttention):
    """``nn.MultiheadAttention`` whose query, key, value and output projections are quantized
    layers (weights and the activations entering them); see the module docstring."""

    q_proj: AttentionProjection
    k_proj: AttentionProjection
    v_proj: AttentionProjection

    @classmethod
    def from_float(
        cls, attention: nn.MultiheadAttention, quantizers: Mapping[str, QuantizerPair]
    ) -> QuantMultiheadAttention:
        """Wrap an existing attention, sharing its parameters (no copy). ``quantizers``:
        projection name (:data:`PROJECTIONS`) -> ``(weight quantizer, input quantizer)``; a
        projection left out, or given ``(None, None)``, computes in float."""
        unknown = set(quantizers) - set(PROJECTIONS)
        if unknown:
            raise ValueError(
                f"unknown attention projection(s) {sorted(unknown)}; use {', '.join(PROJECTIONS)}"
            )
        twin = cls(
            attention.embed_dim,
            attention.num_heads,
            dropout=attention.dropout,
            bias=attention.in_proj_bias is not None,
            add_bias_kv=attention.bias_k is not None,
            add_zero_attn=attention.add_zero_attn,
            kdim=attention.kdim,
            vdim=attention.vdim,
            batch_first=attention.batch_first,
            device="meta",
        )
        for name in ("in_proj_weight", *_SEPARATE_WEIGHTS, "in_proj_bias", "bias_k", "bias_v"):
            setattr(twin, name, getattr(attention, name))
        weight_q, act_q = quantizers.get("out_proj", (None, None))
        out_proj = attention.out_proj
        if weight_q is not None or act_q is not None:
            out_proj = QuantLinear.from_float(out_proj, weight_q, act_q)
        twin.out_proj = out_proj  # type: ignore[assignment]
        for index, name in enumerate(INPUT_PROJECTIONS):
            setattr(
                twin, name, AttentionProjection(twin, index, *quantizers.get(name, (None, None)))
            )
        twin.train(attention.training)
        return twin

    def projections(self) -> list[nn.Module]:
        """The query, key, value and output projections."""
        return [getattr(self, name) for name in PROJECTIONS]

    @property
    def quantizes(self) -> bool:
        """Whether a projection quantizes (else the forward is ``nn.MultiheadAttention``'s)."""
        return not all(_computes_float(layer) for layer in self.projections())

    def forward(  # type: ignore[override]
        self,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        key_padding_mask: Tensor | None = None,
        need_weights: bool = True,
        attn_mask: Tensor | None = None,
        average_attn_weights: bool = True,
        is_causal: bool = False,
    ) -> tuple[Tensor, Tensor | None]:
        if not self.quantizes:
            return super().forward(
                query, key, value, key_padding_mask, need_weights, attn_mask,
                average_attn_weights, is_causal,
            )  # fmt: skip
        batched = query.dim() == 3
        if not batched:  # one sequence: a batch of one, on axis 1
            query, key, value = (x.unsqueeze(1) for x in (query, key, value))
            if key_padding_mask is not None:
                key_padding_mask = key_padding_mask.unsqueeze(0)
        elif self.batch_first:
            query, key, value = (x.transpose(1, 0) for x in (query, key, value))
        out, weights = attend(
            self,
            self.q_proj(query),
            self.k_proj(key),
            self.v_proj(value),
            key_padding_mask=key_padding_mask,
            need_weights=need_weights,
            attn_mask=attn_mask,
            average_attn_weights=average_attn_weights,
            is_causal=is_causal,
        )
        if not batched:
            return out.squeeze(1), None if weights is None else weights.squeeze(0)
        return (out.transpose(1, 0) if self.batch_first else out), weights


def _computes_float(layer: nn.Module) -> bool:
    """A projection that computes its float op: a quantized layer with quantization off or no
    quantizer, or the float ``out_proj`` (an export view's deployable layers do not)."""
    if isinstance(layer, QuantizedLayer):
        return not layer.quantizes
    return type(layer) in (nn.Linear, nn.modules.linear.NonDynamicallyQuantizableLinear)


def attend(
    attention: nn.MultiheadAttention,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    key_padding_mask: Tensor | None = None,
    need_weights: bool = True,
    attn_mask: Tensor | None = None,
    average_attn_weights: bool = True,
    is_causal: bool = False,
) -> tuple[Tensor, Tensor | None]:
    """``F.multi_head_attention_forward`` from the projected ``q`` (L, N, E), ``k`` and ``v``
    (S, N, E) on: ``attention``'s ``bias_k``/``bias_v`` and zero attention, the masks, scaled
    dot products, softmax, dropout (in training), the weighted sum of the values, then
    ``attention.out_proj`` (called as a module). The same ops in the same order as PyTorch's,
    so that float projections give PyTorch's result. Returns the output (L, N, E) and the
    attention weights (averaged over heads, or per head) or ``None``."""
    tgt_len, bsz, embed_dim = q.shape
    heads, head_dim = attention.num_heads, attention.head_dim
    key_padding_mask = F._canonical_mask(
        mask=key_padding_mask,
        mask_name="key_padding_mask",
        other_type=F._none_or_dtype(attn_mask),
        other_name="attn_mask",
        target_type=q.dtype,
    )
    if is_causal and attn_mask is None:
        raise RuntimeError(
            "is_causal needs attn_mask too (nn.Transformer.generate_square_subsequent_mask)"
        )
    if is_causal and key_padding_mask is None and not need_weights:
        attn_mask = None  # scaled_dot_product_attention's own causal mask
    else:
        attn_mask = F._canonical_mask(
            mask=attn_mask,
            mask_name="attn_mask",
            other_type=None,
            other_name="",
            target_type=q.dtype,
            check_other=False,
        )
        is_causal = is_causal and key_padding_mask is None
    if attn_mask is not None:
        attn_mask = _three_dimensional(attn_mask, bsz * heads, tgt_len, k.shape[0])
    if attention.bias_k is not None and attention.bias_v is not None:
        k = torch.cat([k, attention.bias_k.repeat(1, bsz, 1)])
        v = torch.cat([v, attention.bias_v.repeat(1, bsz, 1)])
        attn_mask = None if attn_mask is None else F.pad(attn_mask, (0, 1))
        key_padding_mask = None if key_padding_mask is None else F.pad(key_padding_mask, (0, 1))
    q = q.reshape(tgt_len, bsz * heads, head_dim).transpose(0, 1)
    k = k.reshape(k.shape[0], bsz * heads, head_dim).transpose(0, 1)
    v = v.reshape(v.shape[0], bsz * heads, head_dim).transpose(0, 1)
    if attention.add_zero_attn:
        zeros = torch.zeros((bsz * heads, 1, head_dim), dtype=k.dtype, device=k.device)
        k, v = torch.cat([k, zeros], dim=1), torch.cat([v, zeros], dim=1)
        attn_mask = None if attn_mask is None else F.pad(attn_mask, (0, 1))
        key_padding_mask = None if key_padding_mask is None else F.pad(key_padding_mask, (0, 1))
    src_len = k.size(1)
    if key_padding_mask is not None:
        if key_padding_mask.shape != (bsz, src_len):
            raise RuntimeError(
                f"key_padding_mask must have shape {(bsz, src_len)}, got "
                f"{tuple(key_padding_mask.shape)}"
            )
        key_padding_mask = (
            key_padding_mask.view(bsz, 1, 1, src_len)
            .expand(-1, heads, -1, -1)
            .reshape(bsz * heads, 1, src_len)
        )
        attn_mask = key_padding_mask if attn_mask is None else attn_mask + key_padding_mask
    dropout_p = attention.dropout if attention.training else 0.0

    if need_weights:
        q_scaled = q * math.sqrt(1.0 / float(head_dim))
        if attn_mask is not None:
            weights = torch.baddbmm(attn_mask, q_scaled, k.transpose(-2, -1))
        else:
            weights = torch.bmm(q_scaled, k.transpose(-2, -1))
        weights = F.softmax(weights, dim=-1)
        if dropout_p > 0.0:
            weights = F.dropout(weights, p=dropout_p)
        out = torch.bmm(weights, v).transpose(0, 1).reshape(tgt_len * bsz, embed_dim)
        out = attention.out_proj(out).view(tgt_len, bsz, -1)
        weights = weights.view(bsz, heads, tgt_len, src_len)
        return out, weights.mean(dim=1) if average_attn_weights else weights

    if attn_mask is not None:
        if attn_mask.size(0) == 1:
            attn_mask = attn_mask.unsqueeze(0)
        else:
            attn_mask = attn_mask.view(bsz, heads, -1, src_len)
    out = F.scaled_dot_product_attention(
        q.view(bsz, heads, tgt_len, head_dim),
        k.view(bsz, heads, src_len, head_dim),
        v.view(bsz, heads, src_len, head_dim),
        attn_mask,
        dropout_p,
        is_causal,
    )
    out = out.permute(2, 0, 1, 3).reshape(bsz * tgt_len, embed_dim)
    return attention.out_proj(out).view(tgt_len, bsz, -1), None


def _three_dimensional(mask: Tensor, batch_heads: int, tgt_len: int, src_len: int) -> Tensor:
    """A 2-D ``(L, S)`` or 3-D ``(N * heads, L, S)`` attention mask as 3-D; a one-line error
    for any other shape."""
    if mask.dim() == 2 and mask.shape == (tgt_len, src_len):
        return mask.unsqueeze(0)
    if mask.dim() == 3 and mask.shape == (batch_heads, tgt_len, src_len):
        return mask
    raise RuntimeError(
        f"attn_mask must have shape {(tgt_len, src_len)} or {(batch_heads, tgt_len, src_len)}, "
        f"got {tuple(mask.shape)}"
    )
