"""Variational information distillation (VID; Ahn et al. 2019) as the SQAKD Table-7 zoo computes it.

Per tap, a regressor of three 1x1 convolutions without bias (``C_s -> C_t -> C_t -> C_t``, ReLU
between them, no BatchNorm) predicts the teacher's map as the mean ``mu`` of a Gaussian whose
variance is one trainable value per teacher channel, ``var_c = softplus(w_c) + 1e-5``,
initialised to 5. The loss is the Gaussian negative log-likelihood without its constant,

``mean_{b, c, h, w} 0.5 * ((mu - F_t)**2 / var_c + log var_c)``,

a **mean** over every element; taps' terms are summed. When the heights differ, the larger map is
adaptive-average pooled to the smaller first. The loss is not 0 when the prediction is exact:
its value is then ``mean_c 0.5 log var_c``, decreasing towards ``0.5 log 1e-5`` (about -5.76)
as the variances shrink; that is its minimum. Reads every stage output; weight 1.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ._features import check_maps, matching_taps, pool_to_common, storage_names
from .feature_registry import BuildContext, FeatureLoss, Shapes, register_feature_loss

#: the variance floor added after the softplus
VARIANCE_EPS = 1e-5


class VIDRegressor(nn.Module):
    """``C_s -> C_t -> C_t -> C_t`` 1x1 convolutions (no bias), ReLU between, and the per-channel
    variance ``softplus(log_scale) + 1e-5`` (initial variance ``initial_variance``)."""

    def __init__(self, student_channels: int, teacher_channels: int,
                 initial_variance: float = 5.0) -> None:  # fmt: skip
        super().__init__()
        self.regressor = nn.Sequential(
            nn.Conv2d(student_channels, teacher_channels, 1, bias=False),
            nn.ReLU(),
            nn.Conv2d(teacher_channels, teacher_channels, 1, bias=False),
            nn.ReLU(),
            nn.Conv2d(teacher_channels, teacher_channels, 1, bias=False),
        )
        inverse_softplus = math.log(math.expm1(initial_variance - VARIANCE_EPS))
        self.log_scale = nn.Parameter(torch.full((teacher_channels,), inverse_softplus))

    def variance(self) -> Tensor:
        return F.softplus(self.log_scale) + VARIANCE_EPS

    def forward(self, student_map: Tensor, teacher_map: Tensor) -> Tensor:
        student_map, teacher_map = pool_to_common(student_map, teacher_map.detach())
        mean = self.regressor(student_map)
        variance = self.variance().view(1, -1, 1, 1)
        return (0.5 * ((mean - teacher_map).pow(2) / variance + variance.log())).mean()


@register_feature_loss("vid")
class VariationalInformation(FeatureLoss):
    """:class:`VIDRegressor` NLL summed over taps (weight 1, stage outputs)."""

    weight = 1.0
    reads = "stages"
    option_names = ("initial_variance",)

    def __init__(self, student_channels: Mapping[str, int], teacher_channels: Mapping[str, int],
                 initial_variance: float = 5.0) -> None:  # fmt: skip
        super().__init__()
        self._names = storage_names(student_channels)
        self.regressors = nn.ModuleDict(
            {
                name: VIDRegressor(student_channels[tap], teacher_channels[tap], initial_variance)
                for tap, name in self._names.items()
            }
        )

    @classmethod
    def build(cls, student_shapes: Shapes, teacher_shapes: Shapes, context: BuildContext,
              **options: Any) -> VariationalInformation:  # fmt: skip
        return cls(
            {tap: int(shape[0]) for tap, shape in student_shapes.items()},
            {tap: int(shape[0]) for tap, shape in teacher_shapes.items()},
            **options,
        )

    def forward(self, student_features, teacher_features, *, index=None, labels=None) -> Tensor:
        taps = matching_taps(student_features, teacher_features, expected=self._names)
        terms = []
        for tap in taps:
            check_maps("VID", student_features[tap], teacher_features[tap])
            terms.append(self.regressors[self._names[tap]](student_features[tap],
                                                           teacher_features[tap]))  # fmt: skip
        return torch.stack(terms).sum()
