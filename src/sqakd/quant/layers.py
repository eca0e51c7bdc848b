"""Quantized twins of ``nn.Conv1d/2d/3d``, ``nn.ConvTranspose1d/2d``, ``nn.Linear`` and
``nn.Embedding`` (the attention's are in :mod:`sqakd.quant.attention`; which float layer gets
which twin, :mod:`sqakd.quant.twins`).

Each holds an optional weight quantizer and an optional input-activation quantizer, keeps the
float layer's ``weight``/``bias`` parameters and their ``state_dict`` names, and computes exactly
what the float layer computes when both quantizers are ``None`` or quantization is switched off
with :func:`set_quantization`. Depthwise and grouped convolutions need nothing special: the
weight quantizer works per tensor or per output channel (axis 0) whatever the groups.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .base import REDUCED_FLOATS, Quantizer, refuse_reduced_floats
from .batchnorm import AffineBatchNorm
from .deployed import deployed_weight
from .float64_sums import Float64SumConv, conv2d_arguments
from .integer_sums import (
    IntegerWeight,
    channel_shaped,
    expand_groups,
    integer_sums,
    sum_constants,
    window_kernel,
)


class QuantizedLayer(nn.Module):
    """Mixin with the shared quantize-inputs-and-weights logic; the float op is ``_float_forward``."""

    weight: Tensor
    weight_quantizer: Quantizer | None
    act_quantizer: Quantizer | None

    def _init_quantizers(
        self, weight_quantizer: Quantizer | None, act_quantizer: Quantizer | None
    ) -> None:
        self.weight_quantizer = weight_quantizer
        self.act_quantizer = act_quantizer
        self.quantization_enabled = True
        self.register_buffer("calibrated", torch.tensor(False))
        self._pinned_weight: tuple[Tensor, int] | None = None
        self._pinned_integer: IntegerWeight | None = None
        self._deployed_weight: tuple[tuple, list[Tensor], Tensor, IntegerWeight | None] | None = (
            None
        )

    def pin_quantized_weight(self, values: Tensor, integer: IntegerWeight | None = None) -> None:
        """Use ``values`` as the quantized weight until ``self.weight`` changes.

        Loading packed weights needs this for quantizers whose forward recomputes a statistic of
        the whole weight (``mean|w|``, ``min``/``max``): run again on the rebuilt weight, that
        statistic can differ from the saved one in the last float bit. The pin holds the exact
        saved values; any in-place change of the weight (an optimizer step, ``load_state_dict``,
        ``copy_``) bumps the weight's version counter and drops the pin, so training always
        sees the live quantizer. ``integer`` is the saved integer form for
        :meth:`integer_forward` (``None``: the pinned values in the float forward).
        """
        self._pinned_weight = (values.detach().clone(), self.weight._version)
        self._pinned_integer = integer

    def weight_key(self, name: str) -> str:
        """The ``state_dict`` key of the float parameter that holds this layer's weight, for
        the layer at qualified ``name`` (its own ``weight``; an attention projection's is the
        attention's ``in_proj_weight``, shared with the other two)."""
        return f"{name}.weight" if name else "weight"

    def _live_pin(self) -> Tensor | None:
        """The pinned weight values, or ``None`` (dropping a pin the weight has outdated)."""
        if self._pinned_weight is None:
            return None
        values, version = self._pinned_weight
        if version == self.weight._version and values.shape == self.weight.shape:
            return values
        self._pinned_weight = self._pinned_integer = None
        return None

    def _float_forward(self, x: Tensor, weight: Tensor) -> Tensor:
        return self._float_op(x, weight, self.bias)

    def _float_op(self, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        raise NotImplementedError

    @property
    def quantizes(self) -> bool:
        return self.quantization_enabled and (
            self.weight_quantizer is not None or self.act_quantizer is not None
        )

    def quantized_weight(self) -> Tensor:
        """The weight as the quantized layer uses it (the float weight when not quantized)."""
        if self.weight_quantizer is None or not self.quantization_enabled:
            return self.weight
        pinned = self._live_pin()
        if pinned is not None:
            return pinned.to(self.weight.device)
        if not self.weight_quantizer.training and not torch.is_grad_enabled():
            return self.deployed_weight()
        return self.weight_quantizer(self.weight)

    def deployed_weight(self) -> Tensor:
        """The quantized weight as the exported model computes it: its integer codes
        dequantized by ``(codes - zero_point) * scale``, as ONNX ``DequantizeLinear`` does (see
        :func:`sqakd.quant.deployed.deployed_weight`). Inference (eval mode, no autograd) uses
        it, so that PyTorch and ONNX Runtime multiply by bit-identical weights: the method's
        own formula (``2 round(...) / n - 1`` for DoReFa, say) reaches the same levels up to the
        last float bit, and a deep low-bit network can amplify such differences. Cached until
        the weight (version counter) or a quantizer parameter or buffer (value) changes."""
        quantizer = self.weight_quantizer
        assert quantizer is not None
        # the weight by identity and version; the quantizer's few range values by value, since
        # initialisation may write them through ``.data`` (which keeps the version counter)
        weight_key = (self.weight.data_ptr(), self.weight._version, self.weight.device)
        ranges = [t.detach() for t in (*quantizer.parameters(), *quantizer.buffers())]
        cached = self._deployed_weight
        if (
            cached is None
            or cached[0] != weight_key
            or len(cached[1]) != len(ranges)
            or not all(a.shape == b.shape and torch.equal(a, b) for a, b in zip(cached[1], ranges))
        ):
            values, integer = deployed_weight(quantizer, self.weight)
            cached = (weight_key, [t.clone() for t in ranges], values, integer)
            self._deployed_weight = cached
        return cached[2]

    def quantized_input(self, x: Tensor) -> Tensor:
        if self.act_quantizer is None or not self.quantization_enabled:
            return x
        return self.act_quantizer(x)

    @torch.no_grad()
    def calibrate(self, x: Tensor) -> None:
        """Initialise both quantizers from this input and the weight, then let the weight
        quantizer match the float output's magnitude (EWGS's output scale); in float32, also
        when called under autocast (a bfloat16 model is refused: :func:`refuse_reduced_floats`)."""
        refuse_reduced_floats(self.weight.dtype, f"the weight of a {type(self).__name__}")
        if torch.is_autocast_enabled(x.device.type):
            with torch.autocast(x.device.type, enabled=False):
                self._calibrate(x.float() if x.dtype in REDUCED_FLOATS else x)
        else:
            refuse_reduced_floats(x.dtype, f"the input of a {type(self).__name__}")
            self._calibrate(x)
        self.calibrated.fill_(True)

    def _calibrate(self, x: Tensor) -> None:
        if self.act_quantizer is not None:
            self.act_quantizer.calibrate(x)
        self.calibrate_weight(x)

    @torch.no_grad()
    def calibrate_weight(self, x: Tensor) -> None:
        """Initialise the weight quantizer from the weight, then let it match the float output's
        magnitude on input ``x`` (EWGS's output scale), with the activation range as it is now:
        part of :meth:`calibrate`, and run again when calibration over several batches has
        changed the activation range (:class:`sqakd.quant.calibrate.BatchRanges`)."""
        if self.weight_quantizer is None:
            return
        self.weight_quantizer.calibrate(self.weight)
        float_output = self._float_forward(x, self.weight)
        quantized_output = self._float_forward(self.quantized_input(x), self.quantized_weight())
        self.weight_quantizer.match_output(float_output, quantized_output)

    def forward(self, x: Tensor) -> Tensor:
        if not self.quantizes:
            return self._float_forward(x, self.weight)
        if not bool(self.calibrated):
            self.calibrate(x)
        if not self.training and not torch.is_grad_enabled():
            out = self.integer_forward(x)
            if out is not None:
                return out
        return self._float_forward(self.quantized_input(x), self.quantized_weight())

    def integer_forward(self, x: Tensor) -> Tensor | None:
        """Inference on integer codes, as the exported graph computes it: the op (convolution,
        matrix product) on the input codes ``q - z`` and the weight codes, both integer-valued
        floats, then ``* (input scale * weight scale)`` per output channel, plus the terms a
        fractional input or weight zero point adds, then ``+ bias`` (see
        :mod:`sqakd.quant.integer_sums`). Sums of integers are exact in float32 (below 2^24),
        so the result does not depend on the order in which a runtime sums, and PyTorch and
        ONNX Runtime agree bit for bit. ``None`` where a grid has no integer form (non-uniform
        levels, a per-channel activation grid): the caller then runs the fake-quantized float
        forward."""
        wq, aq = self.weight_quantizer, self.act_quantizer
        if wq is None or aq is None or wq.training or aq.training:
            return None
        weight = self.integer_weight()
        if weight is None:
            return None
        codes = aq.deployed_integer(x)
        if codes is None:
            return None
        spatial_dims = self.weight.dim() - 2
        constants = sum_constants(codes.scale, codes.shift, weight, spatial_dims)
        return integer_sums(
            lambda x, w: self._float_op(x, w, None),
            self._window_sums,
            codes.codes,
            weight.codes,
            constants,
            channel_shaped(self.bias, spatial_dims),
        )

    def _window_sums(self, x: Tensor) -> Tensor:
        """``x`` summed over each output's receptive field (the op with an all-ones kernel)."""
        raise NotImplementedError

    def window_kernel(self) -> Tensor:
        """The all-ones kernel of :meth:`_window_sums` (one output per group)."""
        return window_kernel(self.weight)

    def integer_weight(self) -> IntegerWeight | None:
        """The deployed weight as ``codes * scale + offset`` (integer-valued float codes minus
        the zero point; scale and offset 0-d or per output channel), or ``None`` without an
        integer form."""
        if self._live_pin() is not None:  # loaded packed: the saved integer form
            integer = self._pinned_integer
            if integer is None:
                return None
            return IntegerWeight(
                *(None if t is None else t.to(self.weight.device) for t in integer)
            )
        self.deployed_weight()
        assert self._deployed_weight is not None
        return self._deployed_weight[3]


class _QuantConv(QuantizedLayer):
    """Shared by the quantized convolutions: construction from the float layer (sharing its
    parameters) and the window sums. ``float_type`` is the float layer type it twins."""

    float_type: type[nn.Module] = nn.Conv2d
    #: the weight's output-channel axis (1 for a transposed convolution: ``(in, out/groups, k)``)
    output_axis = 0

    def __init__(
        self,
        *args,
        weight_quantizer: Quantizer | None = None,
        act_quantizer: Quantizer | None = None,
        **kwargs,
    ) -> None:
        self.float_type.__init__(self, *args, **kwargs)
        self._init_quantizers(weight_quantizer, act_quantizer)

    @classmethod
    def from_float(cls, conv: nn.Module, weight_quantizer: Quantizer | None, act_quantizer: Quantizer | None):  # fmt: skip
        """Wrap an existing convolution, sharing its parameters (no copy)."""
        layer = cls(
            **conv_arguments(conv),
            device="meta",
            weight_quantizer=weight_quantizer,
            act_quantizer=act_quantizer,
        )
        layer.weight, layer.bias = conv.weight, conv.bias
        layer.train(conv.training)
        return layer

    def _float_op(self, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        return self._conv_forward(x, weight, bias)  # type: ignore[attr-defined]

    def window_kernel(self) -> Tensor:
        return window_kernel(self.weight, self.groups)  # type: ignore[attr-defined]

    def _window_sums(self, x: Tensor) -> Tensor:
        sums = self._float_op(x, self.window_kernel(), None)
        return expand_groups(sums, self.out_channels)  # type: ignore[attr-defined]


class QuantConv1d(_QuantConv, nn.Conv1d):
    """``nn.Conv1d`` with fake-quantized weight and input."""

    float_type = nn.Conv1d


class QuantConv2d(_QuantConv, nn.Conv2d):
    """``nn.Conv2d`` with fake-quantized weight and input."""

    float_type = nn.Conv2d


class QuantConv3d(_QuantConv, nn.Conv3d):
    """``nn.Conv3d`` with fake-quantized weight and input."""

    float_type = nn.Conv3d


class _QuantConvTranspose(_QuantConv):
    """A transposed convolution: its weight is ``(in, out / groups, *kernel)``, so a weight
    quantized per output channel would need scales along axis 1; :func:`~sqakd.quant.prepare`
    gives these layers per-tensor weight quantizers, whose integer sums factor exactly."""

    output_axis = 1

    def _float_op(self, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        return transposed_conv(self)(x, weight, bias)

    def window_kernel(self) -> Tensor:
        # one output channel per group: (in, 1, *kernel) with the layer's groups
        return self.weight.new_ones((self.weight.shape[0], 1, *self.weight.shape[2:]))

    def forward(self, x: Tensor, output_size: list[int] | None = None) -> Tensor:
        if output_size is not None:
            raise ValueError(
                f"{type(self).__name__} takes no output_size once quantized; set the float "
                f"layer's output_padding instead"
            )
        return QuantizedLayer.forward(self, x)


class QuantConvTranspose1d(_QuantConvTranspose, nn.ConvTranspose1d):
    """``nn.ConvTranspose1d`` with fake-quantized weight (per tensor) and input."""

    float_type = nn.ConvTranspose1d


class QuantConvTranspose2d(_QuantConvTranspose, nn.ConvTranspose2d):
    """``nn.ConvTranspose2d`` with fake-quantized weight (per tensor) and input."""

    float_type = nn.ConvTranspose2d


def conv_arguments(conv: nn.Module) -> dict[str, object]:
    """The constructor arguments that rebuild a convolution's (plain or transposed, any
    dimension) shape and options."""
    arguments = conv2d_arguments(conv)  # type: ignore[arg-type]
    if isinstance(conv, nn.modules.conv._ConvTransposeNd):
        arguments["output_padding"] = conv.output_padding
    return arguments


def transposed_conv(layer: nn.Module):  # type: ignore[no-untyped-def]
    """``op(x, weight, bias)``: ``layer``'s transposed convolution with its options."""
    function = (F.conv_transpose1d, F.conv_transpose2d, F.conv_transpose3d)[layer.weight.dim() - 3]
    stride, padding, output_padding = layer.stride, layer.padding, layer.output_padding
    groups, dilation = layer.groups, layer.dilation
    return lambda x, w, b: function(x, w, b, stride, padding, output_padding, groups, dilation)


class QuantLinear(QuantizedLayer, nn.Linear):
    """``nn.Linear`` with fake-quantized weight and input."""

    def __init__(
        self,
        *args,
        weight_quantizer: Quantizer | None = None,
        act_quantizer: Quantizer | None = None,
        **kwargs,
    ) -> None:
        nn.Linear.__init__(self, *args, **kwargs)
        self._init_quantizers(weight_quantizer, act_quantizer)

    @classmethod
    def from_float(
        cls, linear: nn.Linear, weight_quantizer: Quantizer | None, act_quantizer: Quantizer | None
    ) -> QuantLinear:
        """Wrap an existing linear layer, sharing its parameters (no copy)."""
        layer = cls(
            linear.in_features,
            linear.out_features,
            bias=linear.bias is not None,
            device="meta",
            weight_quantizer=weight_quantizer,
            act_quantizer=act_quantizer,
        )
        layer.weight, layer.bias = linear.weight, linear.bias
        layer.train(linear.training)
        return layer

    def _float_op(self, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        return F.linear(x, weight, bias)

    def _window_sums(self, x: Tensor) -> Tensor:
        return F.linear(x, self.window_kernel())


class QuantEmbedding(QuantizedLayer, nn.Embedding):
    """``nn.Embedding`` with a fake-quantized table (per tensor, or one range per row with
    per-channel weights). No input quantizer: the inputs are indices. In inference the lookup
    reads the deployed weight (codes dequantized as ONNX ``DequantizeLinear`` does), so the
    exported ``Gather`` returns the same values bit for bit. Tables that renormalise rows in
    place (``max_norm``) or take sparse gradients stay ``nn.Embedding`` (see
    :func:`~sqakd.quant.twins.twin_for`)."""

    #: an embedding adds no bias (the shared float forward passes this along)
    bias = None

    def __init__(
        self,
        *args,
        weight_quantizer: Quantizer | None = None,
        act_quantizer: Quantizer | None = None,
        **kwargs,
    ) -> None:
        if act_quantizer is not None:
            raise ValueError("an embedding's inputs are indices: give it no act_quantizer")
        nn.Embedding.__init__(self, *args, **kwargs)
        self._init_quantizers(weight_quantizer, None)

    @classmethod
    def from_float(
        cls,
        embedding: nn.Embedding,
        weight_quantizer: Quantizer | None,
        act_quantizer: Quantizer | None = None,
    ) -> QuantEmbedding:
        """Wrap an existing embedding, sharing its weight (no copy); ``act_quantizer`` must be
        ``None`` (the signature of the other twins)."""
        layer = cls(
            embedding.num_embeddings,
            embedding.embedding_dim,
            padding_idx=embedding.padding_idx,
            max_norm=embedding.max_norm,
            norm_type=embedding.norm_type,
            scale_grad_by_freq=embedding.scale_grad_by_freq,
            sparse=embedding.sparse,
            device="meta",
            weight_quantizer=weight_quantizer,
            act_quantizer=act_quantizer,
        )
        layer.weight = embedding.weight
        layer.train(embedding.training)
        return layer

    def _float_op(self, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        return F.embedding(
            x, weight, self.padding_idx, self.max_norm, self.norm_type,
            self.scale_grad_by_freq, self.sparse,
        )  # fmt: skip


def quantized_layers(model: nn.Module) -> list[tuple[str, QuantizedLayer]]:
    """Every quantized layer in ``model`` with its qualified name."""
    return [(name, m) for name, m in model.named_modules() if isinstance(m, QuantizedLayer)]


def quantizers(model: nn.Module) -> list[tuple[str, Quantizer]]:
    """Every quantizer in ``model`` with its qualified name."""
    return [(name, m) for name, m in model.named_modules() if isinstance(m, Quantizer)]


def set_quantization(model: nn.Module, enabled: bool) -> None:
    """Switch fake quantization on or off in every quantized layer, and the deployment
    arithmetic of every :class:`~sqakd.quant.batchnorm.AffineBatchNorm2d` and
    :class:`~sqakd.quant.float64_sums.Float64SumConv` with it (off = the float model,
    exactly)."""
    for module in model.modules():
        if isinstance(module, (QuantizedLayer, AffineBatchNorm, Float64SumConv)):
            module.quantization_enabled = enabled


def set_compiled_kernels(model: nn.Module, enabled: bool) -> None:
    """Run the fused kernels of every quantizer in ``model`` through ``torch.compile``
    (``True``) or eagerly (``False``); other models are not affected. Compiling needs a C++
    compiler (:func:`sqakd.quant.kernels.should_compile_kernels` says when to ask for it); a
    kernel that fails to build runs eagerly, with one warning."""
    for _, quantizer in quantizers(model):
        quantizer.compiled_kernels = bool(enabled)


def uses_compiled_kernels(model: nn.Module) -> bool:
    """Whether ``model``'s quantizers run their fused kernels through ``torch.compile``."""
    return any(quantizer.compiled_kernels for _, quantizer in quantizers(model))


def quantizer_parameters(model: nn.Module) -> list[nn.Parameter]:
    """Parameters that belong to quantizers (ranges, step sizes, output scales)."""
    return [p for _, q in quantizers(model) for p in q.parameters(recurse=False)]


def model_parameters(model: nn.Module) -> list[nn.Parameter]:
    """Every parameter of ``model`` that does not belong to a quantizer."""
    owned = {id(p) for p in quantizer_parameters(model)}
    return [p for p in model.parameters() if id(p) not in owned]
