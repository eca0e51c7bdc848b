"""Turn any ``nn.Module`` into its fake-quantized twin by module replacement (no graph tracing)."""

from __future__ import annotations

import copy
import math
import warnings
from dataclasses import dataclass
from fnmatch import fnmatchcase

import torch
from torch import nn

from .attention import QuantizerPair, QuantMultiheadAttention, projection_shapes
from .base import Quantizer, refuse_reduced_float_model
from .batchnorm import AFFINE_BATCHNORMS, AffineBatchNorm
from .float64_sums import Float64SumConv, can_sum_in_float64, float64_sum_twin
from .layers import QuantEmbedding, QuantizedLayer, quantizers, set_compiled_kernels
from .observers import build_observer
from .policy import FLOAT_BITS, QuantPolicy
from .registry import build_quantizer, quantizer_class
from .twins import twin_for

#: normalisation layers hold weights but are not quantized (not listed as unsupported)
_NORMALISATION = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm)
#: below this fraction of the weights quantized, prepare() warns and describe() says so on top
SMALL_FRACTION = 0.25


@dataclass(frozen=True)
class LayerPlan:
    """What prepare() does to one layer."""

    name: str
    kind: str
    shape: tuple[int, ...]
    weight_method: str | None
    act_method: str | None
    weight_bits: int
    act_bits: int
    note: str = ""

    #: False for a layer with weights that prepare() cannot swap (kept in float, see ``note``)
    supported: bool = True
    #: number of weight values
    weights: int = 0
    #: for one projection of an ``nn.MultiheadAttention`` (``name`` is the attention's name
    #: plus this): ``q_proj``, ``k_proj``, ``v_proj`` or ``out_proj``; "" for a whole layer
    projection: str = ""

    @property
    def quantized(self) -> bool:
        return self.weight_bits != FLOAT_BITS or self.act_bits != FLOAT_BITS


class QuantPlan(list[LayerPlan]):
    """The per-layer decisions of a policy; ``str()`` gives a readable table. From
    :func:`describe`, ``kernels`` names how the model's quantizers run their fused kernels
    (``"compiled"``, ``"eager"``, or ``"mixed"``; ``None`` without quantizers)."""

    kernels: str | None = None

    @property
    def quantized_fraction(self) -> float:
        """The fraction of the listed layers' weight values whose layer is quantized."""
        total = sum(p.weights for p in self)
        return sum(p.weights for p in self if p.quantized) / total if total else 0.0

    def warning(self) -> str | None:
        """One line when nothing or only a small fraction of the weights is quantized."""
        if not any(p.quantized for p in self):
            if any(p.supported for p in self):
                return None  # the policy keeps every layer in float, as asked
            kinds = sorted({p.kind for p in self if not p.supported})
            found = f" (layers with weights: {', '.join(kinds)})" if kinds else ""
            return (
                f"no layer is quantized{found}; sqakd quantizes Conv1d/2d/3d, ConvTranspose1d/2d, "
                f"Linear, MultiheadAttention and, with quant.embeddings, Embedding (see the notes "
                f"column)"
            )
        fraction = self.quantized_fraction
        if fraction < SMALL_FRACTION:
            hint = "quant.first_last=8bit quantizes the first and last layers"
            if any("quant.embeddings" in p.note for p in self.unsupported()):
                hint = f"quant.embeddings: true quantizes the embeddings, {hint}"
            return (
                f"only {fraction:.1%} of the weights are quantized; the rest stay in float (see "
                f"the notes column; {hint})"
            )
        return None

    def unsupported(self) -> list[LayerPlan]:
        """The layers with weights that stay in float because prepare() cannot swap them."""
        return [p for p in self if not p.supported]

    def __str__(self) -> str:
        header = ("layer", "type", "shape", "method", "W bits", "A bits", "note")
        rows = [header] + [
            (
                p.name,
                p.kind,
                "x".join(map(str, p.shape)),
                _method_label(p),
                "float" if p.weight_bits == FLOAT_BITS else str(p.weight_bits),
                "float" if p.act_bits == FLOAT_BITS else str(p.act_bits),
                p.note,
            )
            for p in self
        ]
        widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
        lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]
        lines.insert(1, "  ".join("-" * w for w in widths))
        warning = self.warning()
        if warning:
            lines.insert(0, f"WARNING: {warning}")
        if self.kernels is not None:
            lines.append(f"quantizer kernels: {self.kernels}")
        return "\n".join(lines)


def _method_label(plan: LayerPlan) -> str:
    methods = {
        m
        for m, b in ((plan.weight_method, plan.weight_bits), (plan.act_method, plan.act_bits))
        if m and b != FLOAT_BITS
    }
    if not methods:
        return "-"
    if plan.weight_method == plan.act_method or len(methods) == 1:
        return methods.pop()
    return f"W:{plan.weight_method} A:{plan.act_method}"


def _unsupported_reason(module: nn.Module, embeddings: bool = False) -> str | None:
    """Why a leaf layer with weights stays in float (``None`` for layers prepare() handles and
    for modules without weights of their own)."""
    if isinstance(module, (QuantizedLayer, Quantizer, Float64SumConv, _NORMALISATION)):
        return None
    if isinstance(module, QuantMultiheadAttention):
        return None  # its projections are listed
    twin, reason = twin_for(module, embeddings)
    if twin is not None:
        return None
    if reason:
        return reason
    if not any(True for _ in module.parameters(recurse=False)):
        return None
    return "unsupported type, kept in float"


def _unsupported_row(name: str, module: nn.Module, reason: str) -> LayerPlan:
    weight = getattr(module, "weight", None)
    if not isinstance(weight, torch.Tensor):
        weight = next(module.parameters())
    return LayerPlan(
        name,
        type(module).__name__,
        tuple(weight.shape),
        None,
        None,
        FLOAT_BITS,
        FLOAT_BITS,
        reason,
        supported=False,
        weights=sum(p.numel() for p in module.parameters(recurse=False)),
    )


def _inside_attention(model: nn.Module) -> set[str]:
    """Modules inside a float ``nn.MultiheadAttention`` (its ``out_proj`` is a Linear subclass
    that the attention never calls as a module: swapping it alone would change nothing; the
    attention's twin quantizes it with the other projections)."""
    inside = set()
    for name, module in model.named_modules():
        if isinstance(module, nn.MultiheadAttention) and not isinstance(
            module, QuantMultiheadAttention
        ):
            prefix = f"{name}." if name else ""
            inside |= {prefix + child for child, _ in module.named_modules() if child}
    return inside


@dataclass(frozen=True)
class _Site:
    """One weight prepare() can quantize: a layer (``name == owner``), or one projection of an
    attention (``owner`` is the attention, the module that prepare() swaps)."""

    name: str
    owner: str
    module: nn.Module
    shape: tuple[int, ...]
    projection: str = ""


def _sites(model: nn.Module, embeddings: bool) -> list[_Site]:
    """Every quantizable weight of ``model``, in module order (an attention's four projections
    in the order it uses them)."""
    skipped = _inside_attention(model)
    return [
        site
        for name, module in model.named_modules()
        if name not in skipped and twin_for(module, embeddings)[0] is not None
        for site in _module_sites(name, module)
    ]


def _module_sites(name: str, module: nn.Module) -> list[_Site]:
    """The quantizable weights of one swappable module: itself, or an attention's projections."""
    if isinstance(module, nn.MultiheadAttention):
        prefix = f"{name}." if name else ""
        return [
            _Site(prefix + projection, name, module, shape, projection)
            for projection, shape in projection_shapes(module).items()
        ]
    return [_Site(name, name, module, tuple(module.weight.shape))]  # type: ignore[arg-type]


def _edges(sites: list[_Site]) -> set[str]:
    """The first and last quantizable layers (``quant.first_last``). An attention first in the
    model contributes its three input projections, which all read the model's input."""
    if not sites:
        return set()
    first, last = sites[0], sites[-1]
    edges = {first.name, last.name}
    if first.projection:
        edges |= {s.name for s in sites if s.owner == first.owner and s.projection != "out_proj"}
    return edges


def plan(model: nn.Module, policy: QuantPolicy | None = None) -> QuantPlan:
    """Decide, layer by layer, what :func:`prepare` will do (without changing the model). An
    ``nn.MultiheadAttention`` gets one row per projection (``attention.q_proj``, ...,
    ``attention.out_proj``), which policy patterns match like layer names."""
    policy = policy or QuantPolicy()
    for name in {policy.method, policy.weight_method, policy.act_method} - {None}:
        quantizer_class(name)  # unknown method -> ValueError listing the known ones
    sites = _sites(model, policy.embeddings)
    for pattern in policy.overrides:
        if not any(fnmatchcase(site.name, pattern) for site in sites):
            shown = ", ".join(s.name for s in sites[:4]) or "none: no layer is quantizable"
            raise ValueError(
                f"policy pattern {pattern!r} matches no quantizable layer; layer names are e.g. "
                f"{shown} (see sqakd.quant.plan(model))"
            )
    edges = _edges(sites)
    by_owner: dict[str, list[_Site]] = {}
    for site in sites:
        by_owner.setdefault(site.owner, []).append(site)
    skipped = _inside_attention(model)
    result = QuantPlan()
    for name, module in model.named_modules():
        if name in by_owner:
            result += [_layer_plan(site, policy, site.name in edges) for site in by_owner[name]]
            continue
        reason = None if name in skipped else _unsupported_reason(module, policy.embeddings)
        if reason:
            result.append(_unsupported_row(name, module, reason))
    return result


def _layer_plan(site: _Site, policy: QuantPolicy, is_edge: bool) -> LayerPlan:
    name, module = site.name, site.module
    weight_method = policy.weight_method or policy.method
    act_method = policy.act_method or policy.method
    weight_bits, act_bits, note = policy.weight_bits, policy.act_bits, ""
    if is_edge and policy.first_last == "float":
        weight_bits, act_bits, note = FLOAT_BITS, FLOAT_BITS, "first/last layer kept in float"
    elif is_edge and policy.first_last == "8bit":
        weight_bits, act_bits, note = 8, 8, "first/last layer at 8 bits"
    for pattern, override in policy.overrides.items():
        if not fnmatchcase(name, pattern):
            continue
        note = f"override {pattern!r}"
        weight_method = override.weight_method or override.method or weight_method
        act_method = override.act_method or override.method or act_method
        weight_bits = override.weight_bits if override.weight_bits is not None else weight_bits
        act_bits = override.act_bits if override.act_bits is not None else act_bits
    for method in (weight_method, act_method):
        quantizer_class(method)
    transposed = isinstance(module, nn.modules.conv._ConvTransposeNd)
    if transposed and weight_bits != FLOAT_BITS and policy.per_channel_weights:
        note = "; ".join(filter(None, [note, "per-tensor weights (transposed convolution)"]))
    if isinstance(module, nn.Embedding):  # its inputs are indices
        act_method, act_bits = None, FLOAT_BITS
    return LayerPlan(
        name,
        type(module).__name__,
        site.shape,
        weight_method,
        act_method,
        weight_bits,
        act_bits,
        note,
        weights=math.prod(site.shape),
        projection=site.projection,
    )


def prepare(
    model: nn.Module,
    policy: QuantPolicy | None = None,
    inplace: bool = False,
    compiled_kernels: bool = False,
) -> nn.Module:
    """Return a copy of ``model`` whose layers are swapped for quantized twins: convolutions,
    linear layers, the four projections of every ``nn.MultiheadAttention``
    (:class:`~sqakd.quant.attention.QuantMultiheadAttention`) and, with ``policy.embeddings``,
    the weights of every ``nn.Embedding`` (see :func:`~sqakd.quant.twins.twin_for`).

    The copy keeps every parameter name, so a float ``state_dict`` loads into it. Layers the
    policy keeps in float stay ordinary modules; layer types without a quantized twin are left
    in float and appear in :func:`plan`'s table. When any layer is quantized, every
    ``nn.BatchNorm2d`` becomes an :class:`~sqakd.quant.batchnorm.AffineBatchNorm2d` (same
    parameters and training behaviour; in eval mode the affine ``x * alpha + beta`` that the
    exported graph computes too), and a first ungrouped ``nn.Conv1d/2d/3d`` kept in float becomes
    a :class:`~sqakd.quant.float64_sums.Float64SumConv` (in inference, summed in float64 as the
    exported graph does too).

    ``compiled_kernels``: the quantizers run their fused kernels through ``torch.compile``
    (see :func:`~sqakd.quant.set_compiled_kernels`, which changes it later); eager by default.

    A model cast to bfloat16 or float16 is refused (one line): quantization keeps its weights
    and ranges float32; mixed precision is ``torch.autocast`` around a float32 model
    (``run.precision: bf16``, see :mod:`sqakd.quant.base`).
    """
    refuse_reduced_float_model(model, "sqakd.prepare")
    policy = policy or QuantPolicy()
    decisions = plan(model, policy)
    prepared = model if inplace else copy.deepcopy(model)
    attentions: dict[str, dict[str, QuantizerPair]] = {}
    for decision in decisions:
        if not decision.quantized or not decision.supported:
            continue
        if decision.projection:  # swapped below, with the attention's other projections
            owner = decision.name.removesuffix(decision.projection).removesuffix(".")
            weight_q = _make(decision.weight_method, decision.weight_bits, "weight", policy)
            act_q = _make(decision.act_method, decision.act_bits, "activation", policy)
            attentions.setdefault(owner, {})[decision.projection] = (weight_q, act_q)
            continue
        float_layer = prepared.get_submodule(decision.name)
        twin = twin_for(float_layer, policy.embeddings)[0]
        assert twin is not None
        per_channel = getattr(twin, "output_axis", 0) == 0
        weight_q = _make(
            decision.weight_method, decision.weight_bits, "weight", policy, per_channel
        )
        act_q = _make(decision.act_method, decision.act_bits, "activation", policy)
        layer = twin.from_float(float_layer, weight_q, act_q)  # type: ignore[attr-defined]
        prepared = _put(prepared, decision.name, layer.to(float_layer.weight.device))
    for owner, pairs in attentions.items():
        attention = prepared.get_submodule(owner)
        assert isinstance(attention, nn.MultiheadAttention)
        twin = QuantMultiheadAttention.from_float(attention, pairs)
        prepared = _put(prepared, owner, twin.to(attention.out_proj.weight.device))
    notes = _attach_observer(prepared, policy)
    if any(decision.quantized for decision in decisions):
        _skip_fused_transformer_kernels(prepared)
        notes += _use_affine_batchnorm(prepared)
        _sum_float_first_layer_in_float64(prepared, decisions)
    _warn(decisions, notes)
    set_compiled_kernels(prepared, compiled_kernels)
    return prepared


def _warn(decisions: QuantPlan, notes: list[str]) -> None:
    """One warning line per kind of problem: layers kept in float for lack of a twin, batch
    norms left native, and nothing or a small fraction of the weights quantized."""
    unsupported = decisions.unsupported()
    if unsupported:
        shown = "; ".join(f"{p.name} ({p.kind}): {p.note}" for p in unsupported[:4])
        more = f"; and {len(unsupported) - 4} more" if len(unsupported) > 4 else ""
        notes.insert(0, f"{len(unsupported)} layer(s) with weights stay in float: {shown}{more}")
    warning = decisions.warning()
    if warning:
        notes.append(warning)
    for note in notes:
        warnings.warn(f"sqakd.prepare: {note}", UserWarning, stacklevel=3)


def _attach_observer(model: nn.Module, policy: QuantPolicy) -> list[str]:
    """Give every quantizer that takes a range the policy's observer (none for ``native``).
    Returns one line naming the quantizers that take none and keep their own initialisation;
    refuses an observer that no quantizer of the model would use."""
    observer = build_observer(policy.observer, policy.observer_percentile)
    if observer is None:
        return []
    kept, used = set(), 0
    for _, quantizer in quantizers(model):
        if quantizer.range_kind is None:
            kept.add(f"{quantizer.method} {quantizer.role}s")
        else:
            quantizer.observer = observer
            used += 1
    if kept and not used:
        raise ValueError(
            f"quant.observer={policy.observer} would set no range: {', '.join(sorted(kept))} take "
            f"none (fixed, non-uniform or recomputed at every forward); use quant.observer=native, "
            f"or lsq, lsq+, ewgs, ste, dsq (weights and activations), pact or minmax (activations)"
        )
    if not kept:
        return []
    return [
        f"quant.observer={policy.observer} does not apply to {', '.join(sorted(kept))} (they take "
        f"no range): they keep their own initialisation"
    ]


def _sum_float_first_layer_in_float64(model: nn.Module, decisions: QuantPlan) -> None:
    """Swap the first layer, when the policy keeps it in float and is an ungrouped
    ``nn.Conv1d/2d/3d``, for its :class:`Float64SumConv` twin, whose inference an exported graph
    repeats bit for bit (see :mod:`sqakd.quant.float64_sums`)."""
    first = next((d for d in decisions if d.supported), None)
    if first is None or first.quantized or first.projection:
        return
    layer = model.get_submodule(first.name)
    if can_sum_in_float64(layer):
        replace_module(model, first.name, float64_sum_twin(layer))


def _skip_fused_transformer_kernels(model: nn.Module) -> None:
    """``nn.TransformerEncoderLayer`` (and ``nn.TransformerEncoder``, through nested tensors)
    run one fused kernel in inference (eval, no autograd) that reads the attention's and the
    linear layers' float weights directly, skipping every quantized layer inside them (and so
    calibration too). Turn that path off for the ones that hold a quantized layer: an encoder
    stops converting to nested tensors (``use_nested_tensor``), a layer stops flagging its
    activation as the kernel's relu/gelu (the flag only picks that kernel; the module path calls
    ``activation`` itself)."""
    for module in model.modules():
        fused = isinstance(module, (nn.TransformerEncoderLayer, nn.TransformerEncoder))
        if not fused or not any(isinstance(m, QuantizedLayer) for m in module.modules()):
            continue
        if isinstance(module, nn.TransformerEncoderLayer):
            module.activation_relu_or_gelu = 0
        else:
            module.use_nested_tensor = False


def _use_affine_batchnorm(model: nn.Module) -> list[str]:
    """Swap every ``nn.BatchNorm1d/2d/3d``, and every subclass that keeps its parent's forward,
    for its :class:`AffineBatchNorm` twin (same parameters), whose inference arithmetic the
    exported graph repeats exactly. Returns one line naming the batch norms left as they are."""
    kept = []
    for name, module in list(model.named_modules()):
        if isinstance(module, AffineBatchNorm):
            continue
        for float_type, twin in AFFINE_BATCHNORMS.items():
            if not isinstance(module, float_type):
                continue
            if type(module).forward is float_type.forward:
                replace_module(model, name, twin.from_float(module))
            else:
                kept.append(f"{name} ({type(module).__name__})")
    if not kept:
        return []
    return [
        f"batch norm(s) with their own forward kept as they are: {', '.join(kept[:4])}; they "
        f"export as BatchNormalization, so ONNX Runtime may differ from PyTorch in the last bit"
    ]


def _make(
    method: str | None, bits: int, role: str, policy: QuantPolicy, per_channel: bool = True
) -> Quantizer | None:
    if method is None or bits == FLOAT_BITS:
        return None
    per_channel = per_channel and policy.per_channel_weights and role == "weight"
    role_options = policy.weight_options if role == "weight" else policy.act_options
    options = {**policy.method_options, **role_options}
    return build_quantizer(method, bits, role, per_channel=per_channel, **options)


def _put(model: nn.Module, name: str, layer: nn.Module) -> nn.Module:
    """:func:`replace_module`, and for the model itself (``name == ""``) the layer."""
    if not name:
        return layer
    replace_module(model, name, layer)
    return model


def replace_module(model: nn.Module, name: str, layer: nn.Module) -> None:
    """Put ``layer`` at qualified ``name`` in ``model`` (module replacement, no tracing)."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, layer)


def describe(model: nn.Module) -> QuantPlan:
    """The quantization table of a (prepared) model: every quantizable and unsupported layer,
    and how its quantizers run their kernels (``kernels``, the table's last line); a first line
    ``WARNING: ...`` when nothing or only a small fraction of the weights is quantized."""
    result = QuantPlan()
    skipped = _inside_attention(model)
    embeddings = any(isinstance(m, QuantEmbedding) for m in model.modules())
    modes = {q.compiled_kernels for _, q in quantizers(model)}
    if modes:
        result.kernels = "mixed" if len(modes) > 1 else "compiled" if modes.pop() else "eager"
    for name, module in model.named_modules():
        if isinstance(module, QuantizedLayer):
            wq, aq = module.weight_quantizer, module.act_quantizer
            row = LayerPlan(
                name,
                type(module).__name__,
                tuple(module.weight.shape),
                wq.method if wq else None,
                aq.method if aq else None,
                wq.bits if wq else FLOAT_BITS,
                aq.bits if aq else FLOAT_BITS,
                weights=module.weight.numel(),
            )
        elif name not in skipped and (
            twin_for(module, embeddings)[0] is not None or isinstance(module, Float64SumConv)
        ):
            note = "float"
            if isinstance(module, Float64SumConv):
                note = "float, summed in float64 in inference"
            result += [
                LayerPlan(
                    site.name,
                    type(module).__name__,
                    site.shape,
                    None,
                    None,
                    FLOAT_BITS,
                    FLOAT_BITS,
                    note,
                    weights=math.prod(site.shape),
                    projection=site.projection,
                )  # fmt: skip
                for site in _module_sites(name, module)
            ]
            continue
        elif name not in skipped and (reason := _unsupported_reason(module, embeddings)):
            row = _unsupported_row(name, module, reason)
        else:
            continue
        result.append(row)
    return result
