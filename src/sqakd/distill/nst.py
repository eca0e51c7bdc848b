"""Neuron selectivity transfer (NST; Huang & Wang 2017) as the SQAKD Table-7 zoo computes it.

Per tap, each channel of ``F`` (``[B, C, H, W]`` -> ``[B, C, N]``) is L2-normalised over its
``N`` positions; with the polynomial kernel ``k(x, y) = (x . y)**2`` between channel vectors the
loss is the squared maximum mean discrepancy

``mean K(t, t) + mean K(s, s) - 2 mean K(s, t)``

where each mean runs over the batch and both channel indices (``[B, C, C]``), and the
teacher-teacher term is a constant. It is >= 0 and 0 when the maps are equal. Taps' terms are
**summed**; a larger map is adaptive-average pooled to the smaller height first.

**Released form vs the paper**: the released code uses the degree-2 polynomial kernel with
``c = 0`` and keeps the teacher-teacher term (the paper also studies linear and Gaussian
kernels). Reads every stage output; weight 50.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from ._features import check_maps, pool_to_common
from .feature_registry import TapwiseLoss, register_feature_loss


def polynomial_kernel(x: Tensor, y: Tensor) -> Tensor:
    """``[B, C1, N] x [B, C2, N] -> [B, C1, C2]``: ``(x_i . y_j)**2``."""
    return (x @ y.transpose(1, 2)).pow(2)


def nst_loss(student_map: Tensor, teacher_map: Tensor) -> Tensor:
    """The squared MMD of one pair of maps with the polynomial kernel (see the module docstring)."""
    check_maps("NST", student_map, teacher_map)
    student_map, teacher_map = pool_to_common(student_map, teacher_map.detach())
    s = F.normalize(student_map.flatten(2), dim=2)
    t = F.normalize(teacher_map.flatten(2), dim=2)
    return (
        polynomial_kernel(t, t).mean()
        + polynomial_kernel(s, s).mean()
        - 2 * polynomial_kernel(s, t).mean()
    )


@register_feature_loss("nst")
class NeuronSelectivityTransfer(TapwiseLoss):
    """:func:`nst_loss` summed over taps (released weight 50, stage outputs)."""

    weight = 50.0
    reads = "stages"

    def pair(self, student_map: Tensor, teacher_map: Tensor) -> Tensor:
        return nst_loss(student_map, teacher_map)
