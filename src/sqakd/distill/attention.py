"""Attention-based distillation: attention transfer (AT, the SQAKD Table-7 zoo) and AKT's refined
feature distillation (RFD). Both read the spatial attention map ``normalize(mean_c F**2)``.

## AT

Attention transfer (AT; Zagoruyko & Komodakis 2017) as the SQAKD Table-7 zoo computes it.

For a map ``F`` (``[B, C, H, W]``) the attention map is ``a(F) = normalize(mean_c F**2)``,
flattened to ``[B, H W]`` and divided by its L2 norm. Per tap the loss is
``mean_{b, n} (a(F_s) - a(F_t))**2``; the taps' terms are **summed**. When the two maps differ
in height, the larger is adaptive-average pooled to the smaller first.

**Released form vs the paper**: the paper's AT is ``beta / 2 * || a_s - a_t ||_2`` (an L2 norm
per sample); the released code (and RepDistiller) takes the **mean of squares** over batch and
positions, which is why its weight is 1000. Reads every stage output; weight 1000.

## RFD

AKT's refined feature distillation (RFD, Hong et al. 2025): channel and spatial attention of
tapped feature maps, matched between the full-precision teacher and the quantized student.

For a map ``F`` [B, C, H, W]::

    channel attention   a_ch = softmax over C of ( mean over (h, w) of F^2 )      [B, C]
    spatial attention   a_sp = L2-normalise over N of ( mean over c of F^2 )      [B, H*W]

Each attention vector is re-softened with ``T_fd`` (``softmax(a / T_fd)``, T_fd = 8 as released;
1 gives the paper's equations applied to distributions) and matched by ``KL(teacher || student)``:

    RFD = reduce over layers of [ KL(q_ch || p_ch) + KL(q_sp || p_sp) ]

The KL is summed over the batch (``batch_reduction="sum"``, as released; ``"mean"``: per
sample) and the layers are summed (``layer_reduction="sum"``, as released; ``"mean"``: the
paper's average over the N distilled maps). The teacher's maps are constants.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Literal

import torch.nn.functional as F
from torch import Tensor, nn

from ._features import check_maps, pool_to_common
from .feature_registry import TapwiseLoss, register_feature_loss
from .float32 import computed_in_float32

Reduction = Literal["sum", "mean"]


def channel_attention(features: Tensor) -> Tensor:
    """``softmax_C(mean_hw F^2)``: one distribution over the channels per sample, [B, C]."""
    return F.softmax(features.pow(2).mean(dim=(2, 3)), dim=1)


def spatial_attention(features: Tensor) -> Tensor:
    """``mean_c F^2`` flattened and L2-normalised over the positions (the AT map), [B, H*W]."""
    return F.normalize(features.pow(2).mean(dim=1).flatten(1), p=2, dim=1)


def softened_kl(
    student: Tensor, teacher: Tensor, temperature: float, reduction: Reduction = "sum"
) -> Tensor:
    """``KL(softmax(teacher / T) || softmax(student / T))`` summed over the last axis, then
    summed (or averaged) over the batch."""
    log_p = F.log_softmax(student / temperature, dim=1)
    log_q = F.log_softmax(teacher.detach() / temperature, dim=1)
    per_sample = (log_q.exp() * (log_q - log_p)).sum(dim=1)
    return per_sample.sum() if reduction == "sum" else per_sample.mean()


class RefinedFeatureDistillation(nn.Module):
    """RFD over dicts of tapped maps ``{name: [B, C, H, W]}`` with the same keys (unweighted)."""

    def __init__(
        self,
        temperature: float = 8.0,
        layer_reduction: Reduction = "sum",
        batch_reduction: Reduction = "sum",
    ) -> None:
        super().__init__()
        if temperature <= 0:
            raise ValueError(f"the RFD temperature must be positive, got {temperature}")
        self.temperature = temperature
        self.layer_reduction, self.batch_reduction = layer_reduction, batch_reduction

    def layer_terms(self, student: Tensor, teacher: Tensor) -> tuple[Tensor, Tensor]:
        """``(channel KL, spatial KL)`` of one tapped map."""
        if student.shape != teacher.shape:
            raise ValueError(
                f"RFD needs student and teacher maps of one shape, got {tuple(student.shape)} "
                f"and {tuple(teacher.shape)}"
            )
        teacher = teacher.detach()
        t, reduction = self.temperature, self.batch_reduction
        channel = softened_kl(channel_attention(student), channel_attention(teacher), t, reduction)
        spatial = softened_kl(spatial_attention(student), spatial_attention(teacher), t, reduction)
        return channel, spatial

    @computed_in_float32
    def forward(
        self, student_features: Mapping[str, Tensor], teacher_features: Mapping[str, Tensor]
    ) -> Tensor:
        if set(student_features) != set(teacher_features) or not student_features:
            raise ValueError(
                "RFD needs the same non-empty set of tapped layers from student and teacher, got "
                f"{sorted(student_features)} and {sorted(teacher_features)}"
            )
        terms = [
            sum(self.layer_terms(student_features[k], teacher_features[k]))
            for k in student_features
        ]
        total = sum(terms)
        return total / len(terms) if self.layer_reduction == "mean" else total


# ------------------------------------------------------------------------------------- AT
#: AT's attention map is RFD's spatial attention: ``[B, C, H, W] -> [B, H W]``
attention_map = spatial_attention


def attention_transfer_loss(student_map: Tensor, teacher_map: Tensor) -> Tensor:
    """``mean_{b, n} (a(F_s) - a(F_t))**2`` for one pair of maps (teacher treated as constant)."""
    check_maps("AT", student_map, teacher_map)
    student_map, teacher_map = pool_to_common(student_map, teacher_map.detach())
    return (attention_map(student_map) - attention_map(teacher_map)).pow(2).mean()


@register_feature_loss("at")
class AttentionTransfer(TapwiseLoss):
    """:func:`attention_transfer_loss` summed over taps (released weight 1000, stage outputs)."""

    weight = 1000.0
    reads = "stages"

    def pair(self, student_map: Tensor, teacher_map: Tensor) -> Tensor:
        return attention_transfer_loss(student_map, teacher_map)
