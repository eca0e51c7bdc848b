"""Turn any ``nn.Module`` into its fake-quantized twin by module replacement (no graph tracing)."""

from __future__ import annotations

import copy
from dataclasses import dataclass
from fnmatch import fnmatchcase

from torch import nn

from .base import Quantizer
from .batchnorm import AffineBatchNorm2d
from .float64_sums import Float64SumConv2d, can_sum_in_float64
from .layers import QUANTIZED_TWINS, QuantizedLayer, quantizers, set_compiled_kernels
from .policy import FLOAT_BITS, QuantPolicy
from .registry import build_quantizer, quantizer_class

#: the plan's ``kind`` of the layers prepare() can swap (``Conv2d``, ``Linear``)
TWIN_KINDS = frozenset(t.__name__ for t in QUANTIZED_TWINS)

#: layers that hold weights but have no quantized twin yet: left in float and listed
_NORMALISATION = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm)


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

    @property
    def quantized(self) -> bool:
        return self.weight_bits != FLOAT_BITS or self.act_bits != FLOAT_BITS


class QuantPlan(list[LayerPlan]):
    """The per-layer decisions of a policy; ``str()`` gives a readable table. From
    :func:`describe`, ``kernels`` names how the model's quantizers run their fused kernels
    (``"compiled"``, ``"eager"``, or ``"mixed"``; ``None`` without quantizers)."""

    kernels: str | None = None

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


def _is_unsupported(module: nn.Module) -> bool:
    """A leaf layer with weights that prepare() cannot quantize (it is left in float)."""
    if type(module) in QUANTIZED_TWINS or isinstance(
        module, (QuantizedLayer, Quantizer, Float64SumConv2d, _NORMALISATION)
    ):
        return False
    return any(True for _ in module.parameters(recurse=False))


def _unsupported_row(name: str, module: nn.Module) -> LayerPlan:
    shape = tuple(getattr(module, "weight", next(module.parameters())).shape)
    return LayerPlan(
        name,
        type(module).__name__,
        shape,
        None,
        None,
        FLOAT_BITS,
        FLOAT_BITS,
        "unsupported type, kept in float",
    )


def plan(model: nn.Module, policy: QuantPolicy | None = None) -> QuantPlan:
    """Decide, layer by layer, what :func:`prepare` will do (without changing the model)."""
    policy = policy or QuantPolicy()
    for name in {policy.method, policy.weight_method, policy.act_method} - {None}:
        quantizer_class(name)  # unknown method -> ValueError listing the known ones
    candidates = [(n, m) for n, m in model.named_modules() if type(m) in QUANTIZED_TWINS]
    if not candidates:
        raise ValueError(
            "the model has no nn.Conv2d or nn.Linear layer to quantize; pass the float model itself"
        )
    for pattern in policy.overrides:
        if not any(fnmatchcase(n, pattern) for n, _ in candidates):
            raise ValueError(
                f"policy pattern {pattern!r} matches no quantizable layer; layer names are e.g. "
                f"{', '.join(n for n, _ in candidates[:4])} (see sqakd.quant.plan(model))"
            )
    edges = {candidates[0][0], candidates[-1][0]}
    result = QuantPlan()
    for name, module in model.named_modules():
        if _is_unsupported(module):
            result.append(_unsupported_row(name, module))
            continue
        if type(module) not in QUANTIZED_TWINS:
            continue
        result.append(_layer_plan(name, module, policy, name in edges))
    return result


def _layer_plan(name: str, module: nn.Module, policy: QuantPolicy, is_edge: bool) -> LayerPlan:
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
    return LayerPlan(
        name,
        type(module).__name__,
        tuple(module.weight.shape),
        weight_method,
        act_method,
        weight_bits,
        act_bits,
        note,
    )


def prepare(
    model: nn.Module,
    policy: QuantPolicy | None = None,
    inplace: bool = False,
    compiled_kernels: bool = False,
) -> nn.Module:
    """Return a copy of ``model`` whose Conv2d/Linear layers are swapped for quantized twins.

    The copy keeps every parameter name, so a float ``state_dict`` loads into it. Layers the
    policy keeps in float stay ordinary modules; layer types without a quantized twin are left
    in float and appear in :func:`plan`'s table. When any layer is quantized, every
    ``nn.BatchNorm2d`` becomes an :class:`~sqakd.quant.batchnorm.AffineBatchNorm2d` (same
    parameters and training behaviour; in eval mode the affine ``x * alpha + beta`` that the
    exported graph computes too), and a first convolution kept in float becomes a
    :class:`~sqakd.quant.float64_sums.Float64SumConv2d` (in inference, summed in float64 as the
    exported graph does too).

    ``compiled_kernels``: the quantizers run their fused kernels through ``torch.compile``
    (see :func:`~sqakd.quant.set_compiled_kernels`, which changes it later); eager by default.
    """
    policy = policy or QuantPolicy()
    decisions = plan(model, policy)
    prepared = model if inplace else copy.deepcopy(model)
    for decision in decisions:
        if not decision.quantized or decision.kind not in TWIN_KINDS:
            continue
        float_layer = prepared.get_submodule(decision.name)
        twin = QUANTIZED_TWINS[type(float_layer)]
        weight_q = _make(decision.weight_method, decision.weight_bits, "weight", policy)
        act_q = _make(decision.act_method, decision.act_bits, "activation", policy)
        layer = twin.from_float(float_layer, weight_q, act_q).to(float_layer.weight.device)
        replace_module(prepared, decision.name, layer)
    if any(decision.quantized for decision in decisions):
        _use_affine_batchnorm(prepared)
        _sum_float_first_layer_in_float64(prepared, decisions)
    set_compiled_kernels(prepared, compiled_kernels)
    return prepared


def _sum_float_first_layer_in_float64(model: nn.Module, decisions: QuantPlan) -> None:
    """Swap the first layer, when the policy keeps it in float, for :class:`Float64SumConv2d`,
    whose inference an exported graph repeats bit for bit (see :mod:`sqakd.quant.float64_sums`)."""
    first = next((d for d in decisions if d.kind in TWIN_KINDS), None)
    if first is None or first.quantized:
        return
    layer = model.get_submodule(first.name)
    if can_sum_in_float64(layer):
        replace_module(model, first.name, Float64SumConv2d.from_float(layer))


def _use_affine_batchnorm(model: nn.Module) -> None:
    """Swap every ``nn.BatchNorm2d`` for :class:`AffineBatchNorm2d` (same parameters), whose
    inference arithmetic the exported graph repeats exactly."""
    for name, module in list(model.named_modules()):
        if type(module) is nn.BatchNorm2d:
            replace_module(model, name, AffineBatchNorm2d.from_float(module))


def _make(method: str | None, bits: int, role: str, policy: QuantPolicy) -> Quantizer | None:
    if method is None or bits == FLOAT_BITS:
        return None
    per_channel = policy.per_channel_weights and role == "weight"
    role_options = policy.weight_options if role == "weight" else policy.act_options
    options = {**policy.method_options, **role_options}
    return build_quantizer(method, bits, role, per_channel=per_channel, **options)


def replace_module(model: nn.Module, name: str, layer: nn.Module) -> None:
    """Put ``layer`` at qualified ``name`` in ``model`` (module replacement, no tracing)."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, layer)


def describe(model: nn.Module) -> QuantPlan:
    """The quantization table of a (prepared) model: every Conv2d/Linear and unsupported layer,
    and how its quantizers run their kernels (``kernels``, the table's last line)."""
    result = QuantPlan()
    modes = {q.compiled_kernels for _, q in quantizers(model)}
    if modes:
        result.kernels = "mixed" if len(modes) > 1 else "compiled" if modes.pop() else "eager"
    for name, module in model.named_modules():
        if isinstance(module, QuantizedLayer):
            wq, aq = module.weight_quantizer, module.act_quantizer
            result.append(
                LayerPlan(
                    name,
                    type(module).__name__,
                    tuple(module.weight.shape),
                    wq.method if wq else None,
                    aq.method if aq else None,
                    wq.bits if wq else FLOAT_BITS,
                    aq.bits if aq else FLOAT_BITS,
                )
            )
        elif type(module) in QUANTIZED_TWINS or isinstance(module, Float64SumConv2d):
            result.append(
                LayerPlan(
                    name,
                    type(module).__name__,
                    tuple(module.weight.shape),
                    None,
                    None,
                    FLOAT_BITS,
                    FLOAT_BITS,
                    "float, summed in float64 in inference"
                    if isinstance(module, Float64SumConv2d)
                    else "float",
                )
            )
        elif _is_unsupported(module):
            result.append(_unsupported_row(name, module))
    return result
