"""A float convolution whose inference another runtime can repeat bit for bit.

Under the papers' convention (``quant.first_last: float``, the default) the first convolution sees
the image in float. PyTorch and ONNX Runtime sum its products in different orders, and about
three quarters of its outputs then differ in the last float32 bit; a low-bit network downstream
can turn such a bit into a different code at the first quantizer, and a chaotic one into a
different prediction. Summed in float64 and rounded once to float32, the result no longer depends
on the order: two float64 sums of the same float32 products differ by far less than a float32
rounding step, so both runtimes round to the same float32 (except at a near-tie, about one output
in ten million).

:func:`sqakd.quant.prepare` therefore swaps the first layer, when it stays in float and is an
ungrouped ``nn.Conv1d``, ``nn.Conv2d`` or ``nn.Conv3d``, for :class:`Float64SumConv1d`,
:class:`Float64SumConv2d` or :class:`Float64SumConv3d`: PyTorch's convolution in training and
with autograd on, the float64 sums in inference. The export writes the same sums as im2col, a
float64 ``MatMul`` and a ``Cast`` (:class:`Float64SumConvExport`). The cost is the first layer's
inference in float64, a small layer (27 products per output for a 3x3 RGB convolution).
Transposed convolutions and a first ``nn.Linear`` stay PyTorch's float32 layers.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

#: the plain convolutions a float first layer may be (``nn.ConvNd`` -> spatial dimensions)
SPATIAL_DIMS: dict[type[nn.Module], int] = {nn.Conv1d: 1, nn.Conv2d: 2, nn.Conv3d: 3}


def conv2d_arguments(conv: nn.Module) -> dict[str, object]:
    """The constructor arguments that rebuild ``conv``'s shape and options (any dimension)."""
    return dict(
        in_channels=conv.in_channels,
        out_channels=conv.out_channels,
        kernel_size=conv.kernel_size,
        stride=conv.stride,
        padding=conv.padding,
        dilation=conv.dilation,
        groups=conv.groups,
        bias=conv.bias is not None,
        padding_mode=conv.padding_mode,
    )


def can_sum_in_float64(conv: nn.Module) -> bool:
    """Whether ``conv`` is a plain ungrouped ``nn.Conv1d/2d/3d`` with numeric padding (what the
    im2col export handles)."""
    return type(conv) in SPATIAL_DIMS and conv.groups == 1 and not isinstance(conv.padding, str)


class Float64SumConv(nn.Module):
    """Shared by the ``Float64SumConvNd``: an ``nn.ConvNd`` whose convolution, in eval mode
    without autograd, is summed in float64 and rounded once to the input's dtype, then the bias
    is added. With ``quantization_enabled`` off (:func:`~sqakd.quant.set_quantization`) it is
    PyTorch's own float kernel throughout. ``float_type`` is the convolution it twins."""

    float_type: type[nn.Module] = nn.Conv2d
    quantization_enabled: bool = True
    weight: Tensor
    bias: Tensor | None

    @classmethod
    def from_float(cls, conv: nn.Module) -> Float64SumConv:
        """Wrap an existing convolution, sharing its parameters (no copy)."""
        if type(conv) is not cls.float_type or not can_sum_in_float64(conv):
            raise ValueError(
                f"{cls.__name__} wraps an ungrouped nn.{cls.float_type.__name__} with numeric "
                f"padding, got {conv}"
            )
        twin = cls(**conv2d_arguments(conv), device="meta")  # type: ignore[call-arg]
        twin.weight, twin.bias = conv.weight, conv.bias
        twin.train(conv.training)
        return twin

    def forward(self, x: Tensor) -> Tensor:
        if self.training or torch.is_grad_enabled() or not self.quantization_enabled:
            return super().forward(x)
        conv = self._conv_forward  # type: ignore[attr-defined]  # nn.ConvNd's, by the MRO
        out = conv(x.double(), self.weight.double(), None).to(x.dtype)
        if self.bias is None:
            return out
        return out + self.bias.reshape(1, -1, *[1] * (out.dim() - 2))


class Float64SumConv1d(Float64SumConv, nn.Conv1d):
    """``nn.Conv1d`` summed in float64 in inference (see :class:`Float64SumConv`)."""

    float_type = nn.Conv1d


class Float64SumConv2d(Float64SumConv, nn.Conv2d):
    """``nn.Conv2d`` summed in float64 in inference (see :class:`Float64SumConv`)."""

    float_type = nn.Conv2d


class Float64SumConv3d(Float64SumConv, nn.Conv3d):
    """``nn.Conv3d`` summed in float64 in inference (see :class:`Float64SumConv`)."""

    float_type = nn.Conv3d


#: the float convolution -> its float64-summed twin (what prepare swaps a float first layer for)
FLOAT64_SUM_TWINS: dict[type[nn.Module], type[Float64SumConv]] = {
    nn.Conv1d: Float64SumConv1d,
    nn.Conv2d: Float64SumConv2d,
    nn.Conv3d: Float64SumConv3d,
}


def float64_sum_twin(conv: nn.Module) -> Float64SumConv:
    """``conv`` (for which :func:`can_sum_in_float64` holds) as its float64-summed twin."""
    return FLOAT64_SUM_TWINS[type(conv)].from_float(conv)


class Float64SumConvExport(nn.Module):
    """What a :class:`Float64SumConv` exports as: im2col, a float64 matrix product with the
    flattened weight, a cast back to float32, then the bias (ONNX: ``Pad``/``Gather`` for the
    columns, ``Cast``, ``MatMul`` in double, ``Cast``, ``Add``). The columns come from
    ``F.unfold`` for a 2-d convolution and from one strided slice per kernel offset for 1-d and
    3-d ones (``Slice``, ``Concat``)."""

    def __init__(self, conv: nn.modules.conv._ConvNd) -> None:
        super().__init__()
        weight = conv.weight.detach()
        self.register_buffer("weight_matrix", weight.double().reshape(weight.shape[0], -1).clone())
        spatial = weight.dim() - 2
        bias = None if conv.bias is None else conv.bias.detach().reshape(1, -1, *[1] * spatial)
        self.register_buffer("bias", None if bias is None else bias.clone())
        self.kernel_size, self.stride, self.dilation = conv.kernel_size, conv.stride, conv.dilation
        self.padding: tuple[int, ...] = tuple(conv.padding)  # type: ignore[arg-type]
        self.pad: tuple[int, ...] | None = None
        self.padding_mode = conv.padding_mode
        if conv.padding_mode != "zeros":
            self.pad = tuple(conv._reversed_padding_repeated_twice)
            self.padding = (0,) * spatial

    def forward(self, x: Tensor) -> Tensor:
        if self.pad is not None:
            x = F.pad(x, self.pad, mode=self.padding_mode)
        sizes = [
            (size + 2 * pad - dilation * (kernel - 1) - 1) // stride + 1
            for size, pad, dilation, kernel, stride in zip(
                x.shape[2:], self.padding, self.dilation, self.kernel_size, self.stride
            )
        ]
        if len(sizes) == 2:
            columns = F.unfold(
                x.double(), self.kernel_size, self.dilation, self.padding, self.stride
            )
        else:
            columns = self._sliced_columns(x.double(), sizes)
        out = torch.matmul(self.weight_matrix, columns).to(x.dtype)
        out = out.reshape(x.shape[0], self.weight_matrix.shape[0], *sizes)
        return out if self.bias is None else out + self.bias

    def _sliced_columns(self, x: Tensor, sizes: list[int]) -> Tensor:
        """im2col for any dimension: ``(N, C * prod(kernel), prod(sizes))``, the rows ordered
        as the flattened weight's ``(C, *kernel)``, from one strided slice per kernel offset."""
        if any(self.padding):
            x = F.pad(x, [side for pad in reversed(self.padding) for side in (pad, pad)])
        slices = []
        for offset in _offsets(self.kernel_size):
            window = x
            for axis, (index, dilation, stride, size) in enumerate(
                zip(offset, self.dilation, self.stride, sizes), start=2
            ):
                start = index * dilation
                window = window.narrow(axis, start, stride * (size - 1) + 1)
                if stride > 1:
                    window = window[(slice(None),) * axis + (slice(None, None, stride),)]
            slices.append(window)
        stacked = torch.stack(slices, dim=2)  # (N, C, K, *sizes)
        return stacked.reshape(x.shape[0], -1, math.prod(sizes))


def _offsets(kernel_size: tuple[int, ...]) -> list[tuple[int, ...]]:
    """Every kernel offset in row-major order (the flattened weight's order)."""
    offsets: list[tuple[int, ...]] = [()]
    for size in kernel_size:
        offsets = [offset + (index,) for offset in offsets for index in range(size)]
    return offsets
