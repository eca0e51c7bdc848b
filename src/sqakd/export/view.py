"""The export view: a copy of a prepared model in which every quantized layer is replaced by its
deployable twin, whose forward is made of ops that export as ONNX QuantizeLinear and
DequantizeLinear nodes.

For a quantized layer with weight grid ``(scale, zero_point)`` and activation grid::

    weight: DequantizeLinear(codes, scale, zero_point, axis)           integer initializer
    input:  Clip(x + pre_shift) -> QuantizeLinear(input_scale, zi)
                               -> DequantizeLinear(scale, zo) (+ post_shift)
    output: Conv / Gemm(input, weight, float bias)

or, where the grids are uniform (all but APoT's), the integer-sums form that
:meth:`sqakd.quant.QuantizedLayer.integer_forward` computes in PyTorch: the op on
``DequantizeLinear(codes, 1, zero_point)`` of input and weight (integer-valued, exact sums), then
``Mul(input scale * weight scale)``, the exact terms of a fractional zero point
(:mod:`sqakd.quant.integer_sums`) and ``Add(bias)``; and each
:class:`~sqakd.quant.batchnorm.AffineBatchNorm2d` becomes ``Mul``/``Add`` with its constants
(see :mod:`sqakd.quant.grid` for the shifts and containers), and a first convolution kept in
float (:class:`~sqakd.quant.float64_sums.Float64SumConv`) its float64 im2col form. What has no
integer form stays
in float and is named in the layer's report: weights on non-uniform grids (e.g. APoT) become
their fake-quantized float values; activations on non-uniform grids become a nearest-level
lookup (a binary search over the sorted levels: ``log2(levels)`` Gather/Greater/Where steps),
used only after checking that it reproduces the quantizer's forward on a dense probe of its
range, and otherwise the quantizer's own forward exported as float ops. Only the quantizer
contract (``grid()``, ``codes()``, the forward) is used: no method is special-cased.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..quant import QuantGrid, QuantizedLayer, Quantizer, QuantLinear, quantized_layers
from ..quant import integer_sums as sums
from ..quant.attention import AttentionProjection
from ..quant.batchnorm import AffineBatchNorm, ChannelAffine
from ..quant.deployed import check_calibrated, weight_codes
from ..quant.float64_sums import Float64SumConv, Float64SumConvExport, conv2d_arguments
from ..quant.grid import (
    CONTAINERS,
    ActivationForm,
    WeightForm,
    activation_form,
    broadcast_channels,
    weight_form,
)
from ..quant.layers import QuantEmbedding, _QuantConv, _QuantConvTranspose, transposed_conv
from ..quant.policy import FLOAT_BITS
from ..quant.prepare import replace_module


class QuantizeLinear(torch.autograd.Function):
    """``clamp(round(x / scale) + zero_point)`` in the zero point's integer type; exports as
    ONNX ``QuantizeLinear`` (round half to even, saturation to the type, as ONNX specifies)."""

    @staticmethod
    def forward(ctx, x: Tensor, scale: Tensor, zero_point: Tensor) -> Tensor:  # type: ignore[override]
        lowest, highest, dtype = _container_of(zero_point)
        codes = torch.round(x / scale) + zero_point.float()
        return torch.clamp(codes, lowest, highest).to(dtype)

    @staticmethod
    def symbolic(g, x, scale, zero_point):  # type: ignore[no-untyped-def]
        return g.op("QuantizeLinear", x, scale, zero_point)


class DequantizeLinear(torch.autograd.Function):
    """``scale * (codes - zero_point)``, per tensor or per channel along ``axis``; exports as
    ONNX ``DequantizeLinear``."""

    @staticmethod
    def forward(ctx, codes: Tensor, scale: Tensor, zero_point: Tensor, axis: int | None) -> Tensor:  # type: ignore[override]
        if axis is not None:
            shape = [1] * codes.dim()
            shape[axis] = -1
            scale, zero_point = scale.reshape(shape), zero_point.reshape(shape)
        return (codes.float() - zero_point.float()) * scale

    @staticmethod
    def symbolic(g, codes, scale, zero_point, axis):  # type: ignore[no-untyped-def]
        if axis is None:
            return g.op("DequantizeLinear", codes, scale, zero_point)
        return g.op("DequantizeLinear", codes, scale, zero_point, axis_i=axis)


def _container_of(zero_point: Tensor) -> tuple[int, int, torch.dtype]:
    return next(c for c in CONTAINERS.values() if c[2] == zero_point.dtype)


FloatOp = Callable[[Tensor, Tensor, Tensor | None], Tensor]


def _conv_op(layer: nn.Module) -> FloatOp:
    assert isinstance(layer, nn.modules.conv._ConvNd)
    if isinstance(layer, _QuantConvTranspose):
        return transposed_conv(layer)
    conv = (F.conv1d, F.conv2d, F.conv3d)[layer.weight.dim() - 3]
    stride, dilation, groups = layer.stride, layer.dilation, layer.groups
    if layer.padding_mode == "zeros":
        padding = layer.padding
        return lambda x, w, b: conv(x, w, b, stride, padding, dilation, groups)
    pad, mode = layer._reversed_padding_repeated_twice, layer.padding_mode
    return lambda x, w, b: conv(F.pad(x, pad, mode=mode), w, b, stride, 0, dilation, groups)


def _linear_op(layer: nn.Module) -> FloatOp:
    return F.linear


def _embedding_op(layer: nn.Module) -> FloatOp:
    return lambda x, w, b: F.embedding(x, w)  # Gather; padding_idx only shapes the gradient


#: quantized layer type (or base) -> the float op its deployable twin runs
FLOAT_OPS: dict[type[QuantizedLayer], Callable[[nn.Module], FloatOp]] = {
    _QuantConv: _conv_op,
    QuantLinear: _linear_op,
    AttentionProjection: _linear_op,
    QuantEmbedding: _embedding_op,
}


def _builder(table: dict[type[QuantizedLayer], Callable], layer: QuantizedLayer) -> Callable:
    kind = next((k for k in table if isinstance(layer, k)), None)
    if kind is None:
        raise ValueError(
            f"no export for quantized layer type {type(layer).__name__}; register its op in "
            f"sqakd.export.view.FLOAT_OPS and WINDOW_OPS"
        )
    return table[kind](layer)


#: ``window(t, kernel)``: the op with an all-ones kernel (one output per group), broadcastable
#: over the output channels (see :mod:`sqakd.quant.integer_sums`)
WindowOp = Callable[[Tensor, Tensor], Tensor]


def _conv_window(layer: nn.Module) -> WindowOp:
    op, out_channels = _conv_op(layer), layer.out_channels
    return lambda x, kernel: sums.expand_groups(op(x, kernel, None), out_channels)


def _linear_window(layer: nn.Module) -> WindowOp:
    return lambda x, kernel: F.linear(x, kernel)


def _no_window(layer: nn.Module) -> WindowOp:
    def window(x: Tensor, kernel: Tensor) -> Tensor:
        raise ValueError(f"{type(layer).__name__} has no input quantizer, so no integer sums")

    return window


#: quantized layer type (or base) -> its window sums, for a weight with a float offset
WINDOW_OPS: dict[type[QuantizedLayer], Callable[[nn.Module], WindowOp]] = {
    _QuantConv: _conv_window,
    QuantLinear: _linear_window,
    AttentionProjection: _linear_window,
    QuantEmbedding: _no_window,
}


@dataclass
class LayerExport:
    """How one quantized layer was exported."""

    name: str
    kind: str
    weight_bits: int
    act_bits: int
    weight_method: str | None
    act_method: str | None
    weight_export: str
    act_export: str
    notes: list[str] = field(default_factory=list)
    #: names of the ONNX tensors holding the layer's input and output (filled in after export)
    input: str = ""
    output: str = ""
    #: integer container of the weight codes ("" when the weight is float)
    weight_container: str = ""

    @property
    def float_fallback(self) -> bool:
        return self.weight_export.startswith("float") or self.act_export.startswith("float")

    def as_dict(self) -> dict[str, object]:
        return dict(self.__dict__)


class ExportedLayer(nn.Module):
    """The deployable twin of a calibrated :class:`~sqakd.quant.QuantizedLayer`."""

    def __init__(self, name: str, layer: QuantizedLayer, integer_sums: bool = True) -> None:
        super().__init__()
        self.op = _builder(FLOAT_OPS, layer)
        self.window_op = _builder(WINDOW_OPS, layer)
        self.register_buffer("bias", None if layer.bias is None else layer.bias.detach().clone())
        wq = layer.weight_quantizer if layer.quantization_enabled else None
        aq = layer.act_quantizer if layer.quantization_enabled else None
        self.report = LayerExport(
            name=name,
            kind=type(layer).__name__,
            weight_bits=wq.bits if wq else FLOAT_BITS,
            act_bits=aq.bits if aq else FLOAT_BITS,
            weight_method=wq.method if wq else None,
            act_method=aq.method if aq else None,
            weight_export="",
            act_export="",
        )
        if not layer.quantization_enabled:
            self.report.notes.append("quantization switched off: exported in float")
        weight = self._set_weight(layer)
        self._set_activation(aq)
        self.runs_integer_sums = integer_sums and weight is not None and self.act is not None
        if self.runs_integer_sums:
            assert weight is not None
            self._set_integer_sums(weight, layer.window_kernel())

    # ---------------------------------------------------------------------------------- weight
    def _set_weight(self, layer: QuantizedLayer) -> WeightForm | None:
        """Store the weight as integer codes where it has an integer form (returned) and as
        float values otherwise (``None``)."""
        self.weight_axis: int | None = None
        self.register_buffer("weight_codes", None)
        self.register_buffer("weight_scale", None)
        self.register_buffer("weight_zero_point", None)
        quantizer = layer.weight_quantizer if layer.quantization_enabled else None
        if quantizer is None:
            self.register_buffer("weight_float", layer.weight.detach().clone())
            self.report.weight_export = "float (not quantized)"
            return None
        codes, values = weight_codes(quantizer, layer.weight)
        form = weight_form(codes, quantizer.grid())
        if isinstance(form, str):
            self.register_buffer("weight_float", values.clone())
            self.report.weight_export = f"float ({form})"
            self.report.notes.append(f"weight kept as its fake-quantized float values: {form}")
            return None
        self._set_integer_weight(form)
        return form

    def _set_integer_weight(self, form: WeightForm) -> None:
        self.register_buffer("weight_float", None)
        self.weight_codes, self.weight_scale = form.codes, form.scale
        self.weight_zero_point, self.weight_axis = form.zero_point, form.axis
        if form.offset is not None:
            offset = broadcast_channels(form.offset, form.codes, form.axis or 0)
            self.register_buffer("weight_offset", offset.clone())
            self.report.notes.append(
                "fractional weight zero point: integer codes plus a float offset per channel"
            )
        kind = "per-channel" if form.axis is not None else "per-tensor"
        self.report.weight_export = f"{form.container} codes, {kind} DequantizeLinear"
        self.report.weight_container = form.container
        if form.doubled:
            self.report.notes.append(
                "half-integer weight zero point carried as codes 2q - 2z with scale/2"
            )

    def weight(self) -> Tensor:
        if self.weight_float is not None:
            return self.weight_float
        weight = DequantizeLinear.apply(
            self.weight_codes, self.weight_scale, self.weight_zero_point, self.weight_axis
        )
        offset = getattr(self, "weight_offset", None)
        return weight if offset is None else weight + offset

    # ------------------------------------------------------------------------------ activation
    def _set_activation(self, quantizer: Quantizer | None) -> None:
        self.act_traced: nn.Module | None = None
        self.act_lookup: LevelLookup | None = None
        self.act: ActivationForm | None = None
        if quantizer is None:
            self.report.act_export = "none (float input)"
            if self.report.kind == QuantEmbedding.__name__:
                self.report.act_export = "none (indices)"
            return
        grid = quantizer.grid()
        form = activation_form(grid)
        if isinstance(form, str):
            lookup = LevelLookup.matching(quantizer, grid)
            if lookup is not None:
                self.act_lookup = lookup
                self.report.act_export = f"float ops (nearest of {lookup.count} levels)"
                self.report.notes.append(f"input on {form}: a nearest-level lookup")
                return
            self.act_traced = copy.deepcopy(quantizer).eval()
            self.report.act_export = f"float ops ({form})"
            self.report.notes.append(f"input quantizer exported as its float forward: {form}")
            return
        self.act = form
        for key in ("q_scale", "q_zero_point", "dq_scale", "dq_zero_point"):
            self.register_buffer(f"act_{key}", getattr(form, key))
        extras = [
            "+shift" if form.pre_shift else "",
            "clip" if form.clip else "",
        ]
        detail = ", ".join(e for e in extras if e)
        self.report.act_export = f"QuantizeLinear/DequantizeLinear {form.container}" + (
            f" ({detail})" if detail else ""
        )
        if form.pre_shift or form.post_shift:
            self.report.notes.append("fractional activation zero point carried as a float shift")

    def _set_integer_sums(self, weight: WeightForm, window_kernel: Tensor) -> None:
        """Run the op on integer codes and scale afterwards, exactly as
        :meth:`sqakd.quant.QuantizedLayer.integer_forward` does in PyTorch: the same constants
        (:func:`~sqakd.quant.integer_sums.sum_constants`), the same terms in the same order."""
        form = self.act
        assert form is not None
        spatial_dims = weight.codes.dim() - 2
        integer = sums.IntegerWeight(weight.codes, weight.scale, weight.offset)
        constants = sums.sum_constants(form.dq_scale, form.post_shift, integer, spatial_dims)
        self.register_buffer("sums_bias", sums.channel_shaped(self.bias, spatial_dims))
        for key, value in vars(constants).items():  # buffers: the graph's initializers
            self.register_buffer(f"sums_{key}", value)
        self.register_buffer("unit_scale", torch.ones_like(weight.scale))
        self.register_buffer("act_unit_scale", torch.ones_like(form.dq_scale))
        if constants.weight_offset is not None:  # int8 ones, dequantized like the weight codes
            self.register_buffer("window_codes", window_kernel.detach().to(torch.int8))
            self.register_buffer("window_zero_point", torch.tensor(0, dtype=torch.int8))
        terms = [
            "input shift" if form.post_shift else "",
            "weight offset" if constants.weight_offset is not None else "",
        ]
        extra = " and ".join(t for t in terms if t)
        self.report.notes.append(
            "integer sums: the op runs on the codes, then x (input scale * weight scale)"
            + (f", plus exact terms for the {extra}" if extra else "")
        )

    def input_codes(self, x: Tensor, form: ActivationForm) -> Tensor:
        """``[+ pre_shift] -> [Clip] -> QuantizeLinear``: the input's integer codes."""
        if form.pre_shift:
            x = x + form.pre_shift
        if form.clip is not None:
            x = torch.clamp(x, form.clip[0], form.clip[1])
        return QuantizeLinear.apply(x, self.act_q_scale, self.act_q_zero_point)

    def integer_forward(self, x: Tensor) -> Tensor:
        assert self.act is not None
        codes = self.input_codes(x, self.act)
        x_int = DequantizeLinear.apply(codes, self.act_unit_scale, self.act_dq_zero_point, None)
        w_int = DequantizeLinear.apply(
            self.weight_codes, self.unit_scale, self.weight_zero_point, self.weight_axis
        )
        return sums.integer_sums(
            lambda x, w: self.op(x, w, None),
            self._window,
            x_int,
            w_int,
            self._constants(),
            self.sums_bias,
        )

    def _constants(self) -> sums.SumConstants:
        """The sum constants as this module's buffers (so that they follow ``.to(device)``)."""
        names = [field.name for field in dataclasses.fields(sums.SumConstants)]
        return sums.SumConstants(**{name: getattr(self, f"sums_{name}") for name in names})

    def _window(self, x: Tensor) -> Tensor:
        kernel = DequantizeLinear.apply(
            self.window_codes, self.act_unit_scale, self.window_zero_point, None
        )
        return self.window_op(x, kernel)

    def quantize_input(self, x: Tensor) -> Tensor:
        if self.act_traced is not None:
            return self.act_traced(x)
        if self.act_lookup is not None:
            return self.act_lookup(x)
        form = self.act
        if form is None:
            return x
        codes = self.input_codes(x, form)
        x = DequantizeLinear.apply(codes, self.act_dq_scale, self.act_dq_zero_point, None)
        if form.post_shift:
            x = x + form.post_shift
        return x

    def forward(self, x: Tensor) -> Tensor:
        if self.runs_integer_sums:
            return self.integer_forward(x)
        return self.op(self.quantize_input(x), self.weight(), self.bias)


class LevelLookup(nn.Module):
    """The nearest of ``count`` sorted levels (ties to the lower one), by binary search: at each
    of ``log2`` steps an index moves up by ``step`` where ``x`` exceeds the midpoint below the
    candidate level. Exports as Gather/Greater/Where on the small threshold table."""

    def __init__(self, levels: Tensor) -> None:
        super().__init__()
        self.count = levels.numel()
        self.steps = [2**i for i in reversed(range(max(1, (self.count - 1).bit_length())))]
        size = 2 * self.steps[0]
        thresholds = torch.full((size,), float("inf"))
        thresholds[: self.count - 1] = (levels[1:] + levels[:-1]) / 2
        padded = torch.cat([levels, levels[-1].expand(size - self.count)])
        self.register_buffer("thresholds", thresholds)
        self.register_buffer("levels", padded)

    def forward(self, x: Tensor) -> Tensor:
        index = torch.zeros_like(x, dtype=torch.int64)
        for step in self.steps:
            candidate = index + step
            index = torch.where(x > self.thresholds[candidate - 1], candidate, index)
        return self.levels[index]

    @classmethod
    @torch.no_grad()
    def matching(cls, quantizer: Quantizer, grid: QuantGrid) -> LevelLookup | None:
        """A lookup over ``grid.levels`` if it reproduces ``quantizer``'s forward on a dense probe
        of the levels' range (away from the midpoints, where the two may round apart)."""
        levels = grid.levels
        if levels is None or levels.dim() != 1 or levels.numel() < 2:
            return None
        levels = levels.detach().float()
        if not bool(torch.all(levels[1:] > levels[:-1])):
            return None
        lookup = cls(levels)
        span = float(levels[-1] - levels[0])
        probe = torch.linspace(float(levels[0]) - span, float(levels[-1]) + span, 20001)
        probe = torch.cat([probe, levels])
        midpoints = lookup.thresholds[: lookup.count - 1]
        near = (probe.unsqueeze(1) - midpoints).abs().min(dim=1).values <= 1e-5 * span
        probe = probe[~near]
        expected = copy.deepcopy(quantizer).eval()(probe)
        return lookup if torch.equal(lookup(probe), expected) else None


def build_export_view(
    model: nn.Module, integer_sums: bool = True
) -> tuple[nn.Module, list[LayerExport]]:
    """A deep copy of ``model`` (eval mode) with every quantized layer swapped for its
    :class:`ExportedLayer`, and the per-layer export decisions.

    With ``integer_sums`` (the default), layers whose grids allow it run their op on integer
    codes and scale afterwards, and every :class:`~sqakd.quant.batchnorm.AffineBatchNorm2d`
    becomes its two element-wise ops (:class:`~sqakd.quant.batchnorm.ChannelAffine`): the graph
    then computes what PyTorch computes in eval mode, operation for operation. Without it (the
    integer-kernel export), the layers dequantize and batch norm stays ``BatchNormalization``,
    the form ONNX Runtime's QDQ fusions and the batch-norm folding look for."""
    layers = quantized_layers(model)
    if not layers:
        raise ValueError(
            "the model has no quantized layer; run `sqakd quantize` first, or "
            "sqakd.prepare(model, policy) and sqakd.calibrate(...) before exporting"
        )
    for name, layer in layers:
        if layer.quantizes:
            check_calibrated(name, layer)
    view = copy.deepcopy(model).eval()
    reports = []
    for name, layer in quantized_layers(view):
        twin = ExportedLayer(name, layer, integer_sums)
        reports.append(twin.report)
        if not name:
            return twin, reports
        replace_module(view, name, twin)
    for name, module in list(view.named_modules()):
        if isinstance(module, AffineBatchNorm):
            replace_module(view, name, _batchnorm_export(module, integer_sums))
        elif isinstance(module, Float64SumConv):
            replace_module(view, name, _float64_sum_export(module, integer_sums))
    return view, reports


def _float64_sum_export(conv: Float64SumConv, integer_sums: bool) -> nn.Module:
    """What a :class:`Float64SumConv` exports as: its float64 sums written out, or a plain
    ``nn.ConvNd`` (``Conv`` in ONNX, which batch-norm folding and the integer kernels expect)."""
    if integer_sums and conv.quantization_enabled:
        return Float64SumConvExport(conv)
    plain = conv.float_type(**conv2d_arguments(conv))
    plain.load_state_dict(conv.state_dict())
    return plain.eval()


def _batchnorm_export(bn: AffineBatchNorm, integer_sums: bool) -> nn.Module:
    """What an :class:`AffineBatchNorm` exports as: its eval-mode arithmetic written out, or a
    plain batch norm (PyTorch's kernel, ``BatchNormalization`` in ONNX)."""
    dims = {nn.BatchNorm1d: 3, nn.BatchNorm2d: 4, nn.BatchNorm3d: 5}
    float_type = next(t for t in dims if isinstance(bn, t))
    if integer_sums and bn.quantization_enabled and bn.running_var is not None:
        with torch.no_grad():
            return ChannelAffine(*bn.affine_terms(), dims=dims[float_type])
    plain = float_type(bn.num_features, bn.eps, bn.momentum, bn.affine, bn.track_running_stats)
    plain.load_state_dict(bn.state_dict())
    return plain.eval()
