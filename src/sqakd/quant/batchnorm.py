"""Batch norm whose inference arithmetic is written out, so that an exported graph can repeat it.

PyTorch's CPU batch-norm kernel and ONNX Runtime's ``BatchNormalization`` round differently (on
random data about a third of the outputs differ in the last bit), and a low-bit network can
turn such a difference into a different quantization code downstream. :func:`sqakd.quant.prepare`
therefore swaps every ``nn.BatchNorm1d/2d/3d`` of a quantized model for an :class:`AffineBatchNorm`,
whose eval forward is the per-channel affine ``x * alpha + beta`` (one multiply, one add), and
the export writes the same two element-wise ops with the same constants. Training mode is
``nn.BatchNorm2d`` unchanged, and the parameter and buffer names are kept.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


class AffineBatchNorm(nn.modules.batchnorm._BatchNorm):
    """A batch norm (any dimension); in eval mode (with running statistics) ``x * alpha + beta``
    where ``alpha = weight / sqrt(running_var + eps)`` (as ``(1 / sqrt(.)) * weight``) and
    ``beta = bias - running_mean * alpha``. With ``quantization_enabled`` off
    (:func:`set_quantization`) it is PyTorch's own kernel, so a prepared model with quantization
    off is the float model exactly. The concrete classes are :class:`AffineBatchNorm1d`,
    :class:`AffineBatchNorm2d` and :class:`AffineBatchNorm3d`."""

    quantization_enabled: bool = True

    @classmethod
    def from_float(cls, bn: nn.modules.batchnorm._BatchNorm) -> AffineBatchNorm:
        """Wrap an existing batch norm, sharing its parameters and buffers (no copy)."""
        twin = cls(
            bn.num_features,
            eps=bn.eps,
            momentum=bn.momentum,
            affine=bn.affine,
            track_running_stats=bn.track_running_stats,
            device="meta",
        )
        for name, param in bn.named_parameters(recurse=False):
            setattr(twin, name, param)
        for name, buffer in bn.named_buffers(recurse=False):
            setattr(twin, name, buffer)
        twin.train(bn.training)
        return twin

    def affine_terms(self) -> tuple[Tensor, Tensor]:
        """``(alpha, beta)``, shape (C,): the eval forward is ``x * alpha + beta`` per channel."""
        assert self.running_var is not None and self.running_mean is not None
        inverse_std = 1.0 / torch.sqrt(self.running_var + self.eps)
        alpha = inverse_std * self.weight if self.weight is not None else inverse_std
        shift = self.running_mean * alpha
        return alpha, (-shift if self.bias is None else self.bias - shift)

    def forward(self, x: Tensor) -> Tensor:
        if self.training or self.running_var is None or not self.quantization_enabled:
            return super().forward(x)
        self._check_input_dim(x)
        alpha, beta = self.affine_terms()
        shape = channel_shape(x.dim())
        return x * alpha.reshape(shape) + beta.reshape(shape)


def channel_shape(dims: int) -> tuple[int, ...]:
    """The shape that broadcasts a per-channel vector over a ``dims``-d ``(N, C, ...)`` tensor."""
    return (1, -1) + (1,) * (dims - 2)


class AffineBatchNorm1d(AffineBatchNorm, nn.BatchNorm1d):
    """``nn.BatchNorm1d`` with the affine eval arithmetic of :class:`AffineBatchNorm`."""


class AffineBatchNorm2d(AffineBatchNorm, nn.BatchNorm2d):
    """``nn.BatchNorm2d`` with the affine eval arithmetic of :class:`AffineBatchNorm`."""


class AffineBatchNorm3d(AffineBatchNorm, nn.BatchNorm3d):
    """``nn.BatchNorm3d`` with the affine eval arithmetic of :class:`AffineBatchNorm`."""


#: float batch norm type -> its affine twin (prepare() swaps these and subclasses that keep the
#: parent's forward)
AFFINE_BATCHNORMS: dict[type[nn.Module], type[AffineBatchNorm]] = {
    nn.BatchNorm1d: AffineBatchNorm1d,
    nn.BatchNorm2d: AffineBatchNorm2d,
    nn.BatchNorm3d: AffineBatchNorm3d,
}


class ChannelAffine(nn.Module):
    """``x * alpha + beta`` per channel with fixed constants: what an :class:`AffineBatchNorm2d`
    becomes in the export view (two element-wise ONNX ops)."""

    def __init__(self, alpha: Tensor, beta: Tensor, dims: int = 4) -> None:
        super().__init__()
        self.register_buffer("alpha", alpha.detach().reshape(channel_shape(dims)).clone())
        self.register_buffer("beta", beta.detach().reshape(channel_shape(dims)).clone())

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() != self.alpha.dim():  # a batch norm 1d on (N, C) as well as (N, C, L)
            shape = channel_shape(x.dim())
            return x * self.alpha.reshape(shape) + self.beta.reshape(shape)
        return x * self.alpha + self.beta
