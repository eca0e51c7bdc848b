"""Flow of solution procedure (FSP; Yim et al. 2017) as the SQAKD Table-7 zoo computes it.

It reads a chain of maps: the input of the first stage (the stem's output), then every stage
output (ResNet-20: ``[16, 32, 32]``, ``[16, 32, 32]``, ``[32, 16, 16]``, ``[64, 8, 8]``). For
each consecutive pair ``(bottom, top)`` the FSP matrix is ``G[b, i, j] = mean_n bottom_i top_j``
(``[B, C_bottom, C_top]``; the larger map of the pair is adaptive-average pooled to the smaller
first), and the loss is ``mean (G_s - G_t)**2`` per pair, **summed** over the pairs. Student and
teacher pairs must have the same channel counts (FSP has no adapter): otherwise a one-line error
names both shapes.

**As released, FSP acts only in a pre-stage**: 30 epochs that train the student's feature layers
on FSP alone (weight 50), after which training goes on with cross-entropy only (the weight has no
effect in the main stage). ``main_stage = False`` says so; the method runs it as its ``pre``
phase.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from ._features import check_maps, matching_taps
from .feature_registry import BuildContext, FeatureLoss, Shapes, register_feature_loss


def fsp_matrix(bottom: Tensor, top: Tensor) -> Tensor:
    """``[B, C1, H, W], [B, C2, h, w] -> [B, C1, C2]``: ``mean_n bottom_i top_j`` at the smaller
    of the two spatial sizes."""
    if bottom.shape[-2:] != top.shape[-2:]:
        size = min(bottom.shape[-2], top.shape[-2]), min(bottom.shape[-1], top.shape[-1])
        bottom = F.adaptive_avg_pool2d(bottom, size)
        top = F.adaptive_avg_pool2d(top, size)
    bottom, top = bottom.flatten(2), top.flatten(2)
    return bottom @ top.transpose(1, 2) / bottom.shape[-1]


@register_feature_loss("fsp")
class FlowOfSolution(FeatureLoss):
    """FSP over consecutive pairs of the chain (weight 50, only in a 30-epoch pre-stage)."""

    weight = 50.0
    reads = "chain"
    pre_epochs = 30
    pre_trains = "student"
    main_stage = False

    def __init__(self, keys: list[str]) -> None:
        super().__init__()
        if len(keys) < 2:
            raise ValueError(f"FSP pairs consecutive maps and needs at least two, got {keys}")
        self.keys = list(keys)

    @classmethod
    def build(cls, student_shapes: Shapes, teacher_shapes: Shapes, context: BuildContext,
              **options: Any) -> FlowOfSolution:  # fmt: skip
        keys = list(student_shapes)
        for bottom, top in zip(keys, keys[1:]):
            s = (student_shapes[bottom][0], student_shapes[top][0])
            t = (teacher_shapes[bottom][0], teacher_shapes[top][0])
            if s != t:
                raise ValueError(
                    f"FSP pairs {bottom!r} and {top!r}: the student's maps "
                    f"{tuple(student_shapes[bottom])}, {tuple(student_shapes[top])} and the "
                    f"teacher's {tuple(teacher_shapes[bottom])}, {tuple(teacher_shapes[top])} "
                    "differ in channels and FSP has no adapter; tap layers of equal width"
                )
        return cls(keys)

    def forward(
        self,
        student_features: Mapping[str, Tensor],
        teacher_features: Mapping[str, Tensor],
        *,
        index: Tensor | None = None,
        labels: Tensor | None = None,
    ) -> Tensor:
        matching_taps(student_features, teacher_features, expected=self.keys)
        terms = []
        for bottom, top in zip(self.keys, self.keys[1:]):
            for key in (bottom, top):
                check_maps("FSP", student_features[key], teacher_features[key])
            g_s = fsp_matrix(student_features[bottom], student_features[top])
            with torch.no_grad():
                g_t = fsp_matrix(teacher_features[bottom], teacher_features[top])
            if g_s.shape != g_t.shape:
                raise ValueError(
                    f"FSP matrices of {bottom!r} -> {top!r} differ: student {tuple(g_s.shape)}, "
                    f"teacher {tuple(g_t.shape)}; FSP has no adapter"
                )
            terms.append((g_s - g_t).pow(2).mean())
        return torch.stack(terms).sum()

    def pre_stage_loss(self, student_features, teacher_features) -> Tensor:
        return self(student_features, teacher_features)
