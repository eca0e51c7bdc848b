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
ungrouped ``nn.Conv2d``, for :class:`Float64SumConv2d`: ``nn.Conv2d`` in training and with
autograd on, the float64 sums in inference. The export writes the same sums as im2col, a float64
``MatMul`` and a ``Cast`` (:class:`Float64SumConvExport`). The cost is the first layer's
inference in float64, a small layer (27 products per output for a 3x3 RGB convolution).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def conv2d_arguments(conv: nn.Conv2d) -> dict[str, object]:
    """The ``nn.Conv2d`` constructor arguments that rebuild ``conv``'s shape and options."""
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
    """Whether ``conv`` is a plain ungrouped ``nn.Conv2d`` with numeric padding (what the im2col
    export handles)."""
    return type(conv) is nn.Conv2d and conv.groups == 1 and not isinstance(conv.padding, str)


class Float64SumConv2d(nn.Conv2d):
    """``nn.Conv2d``; in eval mode without autograd, the convolution is summed in float64 and
    rounded once to the input's dtype, then the bias is added. With ``quantization_enabled`` off
    (:func:`~sqakd.quant.set_quantization`) it is PyTorch's own float kernel throughout."""

    quantization_enabled: bool = True

    @classmethod
    def from_float(cls, conv: nn.Conv2d) -> Float64SumConv2d:
        """Wrap an existing convolution, sharing its parameters (no copy)."""
        if not can_sum_in_float64(conv):
            raise ValueError(
                f"Float64SumConv2d wraps an ungrouped nn.Conv2d with numeric padding, got {conv}"
            )
        twin = cls(**conv2d_arguments(conv), device="meta")  # type: ignore[arg-type]
        twin.weight, twin.bias = conv.weight, conv.bias
        twin.train(conv.training)
        return twin

    def forward(self, x: Tensor) -> Tensor:
        if self.training or torch.is_grad_enabled() or not self.quantization_enabled:
            return super().forward(x)
        out = self._conv_forward(x.double(), self.weight.double(), None).to(x.dtype)
        return out if self.bias is None else out + self.bias.reshape(1, -1, 1, 1)


class Float64SumConvExport(nn.Module):
    """What a :class:`Float64SumConv2d` exports as: im2col (``F.unfold``), a float64 matrix
    product with the flattened weight, a cast back to float32, then the bias (ONNX: ``Pad``/
    ``Gather`` for the columns, ``Cast``, ``MatMul`` in double, ``Cast``, ``Add``)."""

    def __init__(self, conv: Float64SumConv2d) -> None:
        super().__init__()
        weight = conv.weight.detach()
        self.register_buffer("weight_matrix", weight.double().reshape(weight.shape[0], -1).clone())
        bias = None if conv.bias is None else conv.bias.detach().reshape(1, -1, 1, 1).clone()
        self.register_buffer("bias", bias)
        self.kernel_size, self.stride, self.dilation = conv.kernel_size, conv.stride, conv.dilation
        self.padding: tuple[int, ...] = tuple(conv.padding)  # type: ignore[arg-type]
        self.pad: tuple[int, ...] | None = None
        self.padding_mode = conv.padding_mode
        if conv.padding_mode != "zeros":
            self.pad, self.padding = tuple(conv._reversed_padding_repeated_twice), (0, 0)

    def forward(self, x: Tensor) -> Tensor:
        if self.pad is not None:
            x = F.pad(x, self.pad, mode=self.padding_mode)
        sizes = [
            (size + 2 * pad - dilation * (kernel - 1) - 1) // stride + 1
            for size, pad, dilation, kernel, stride in zip(
                x.shape[2:], self.padding, self.dilation, self.kernel_size, self.stride
            )
        ]
        columns = F.unfold(x.double(), self.kernel_size, self.dilation, self.padding, self.stride)
        out = torch.matmul(self.weight_matrix, columns).to(x.dtype)
        out = out.reshape(x.shape[0], self.weight_matrix.shape[0], *sizes)
        return out if self.bias is None else out + self.bias
