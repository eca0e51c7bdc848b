"""Attention transfer (AT; Zagoruyko & Komodakis 2017) as the SQAKD Table-7 zoo computes it.

For a map ``F`` (``[B, C, H, W]``) the attention map is ``a(F) = normalize(mean_c F**2)``,
flattened to ``[B, H W]`` and divided by its L2 norm. Per tap the loss is
``mean_{b, n} (a(F_s) - a(F_t))**2``; the taps' terms are **summed**. When the two maps differ
in height, the larger is adaptive-average pooled to the smaller first.

**Released form vs the paper**: the paper's AT is ``beta / 2 * || a_s - a_t ||_2`` (an L2 norm
per sample); the released code (and RepDistiller) takes the **mean of squares** over batch and
positions, which is why its weight is 1000. Reads every stage output; weight 1000.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import Tensor

from ._features import check_maps, matching_taps, pool_to_common
from .feature_registry import FeatureLoss, register_feature_loss


def attention_map(feature_map: Tensor) -> Tensor:
    """``[B, C, H, W] -> [B, H W]``: the channel mean of squares, L2-normalised per sample."""
    return F.normalize(feature_map.pow(2).mean(1).flatten(1), dim=1)


def attention_transfer_loss(student_map: Tensor, teacher_map: Tensor) -> Tensor:
    """``mean_{b, n} (a(F_s) - a(F_t))**2`` for one pair of maps (teacher treated as constant)."""
    check_maps("AT", student_map, teacher_map)
    student_map, teacher_map = pool_to_common(student_map, teacher_map.detach())
    return (attention_map(student_map) - attention_map(teacher_map)).pow(2).mean()


@register_feature_loss("at")
class AttentionTransfer(FeatureLoss):
    """:func:`attention_transfer_loss` summed over taps (released weight 1000, stage outputs)."""

    weight = 1000.0
    reads = "stages"

    def forward(
        self,
        student_features: Mapping[str, Tensor],
        teacher_features: Mapping[str, Tensor],
        *,
        index: Tensor | None = None,
        labels: Tensor | None = None,
    ) -> Tensor:
        taps = matching_taps(student_features, teacher_features)
        return torch.stack(
            [attention_transfer_loss(student_features[k], teacher_features[k]) for k in taps]
        ).sum()
