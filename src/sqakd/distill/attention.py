"""AKT's refined feature distillation (RFD, Hong et al. 2025): channel and spatial attention of
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
