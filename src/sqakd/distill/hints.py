"""FitNet hints (Romero et al. 2015) as the SQAKD Table-7 zoo computes them.

The student's map on the hint layer (the middle stage; ResNet-20: ``layer2``, ``[B, 32, 16,
16]``) passes through a trainable regressor and is compared to the teacher's map by the mean
squared error (a mean over every element). The regressor (RepDistiller's ``ConvReg``) is sized
from the two maps' shapes: a convolution to the teacher's channels, then BatchNorm and ReLU:

- same height: 1x1 conv (or a ``(1 + h_s - h_t) x (1 + w_s - w_t)`` conv when the student's
  map is larger, but not twice as large);
- student twice as high: 3x3 conv, stride 2, padding 1;
- student half as high: 4x4 transposed conv, stride 2, padding 1;
- anything else (a smaller student map, not half): no regressor fits; a one-line error names
  both shapes.

The ReLU ends the regressor, so it suits the (non-negative) stage outputs. Weight 100.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ._features import check_maps, matching_taps, storage_names
from .feature_registry import BuildContext, FeatureLoss, Shapes, register_feature_loss


def conv_regressor(student_shape: tuple[int, ...], teacher_shape: tuple[int, ...]) -> nn.Module:
    """RepDistiller's ``ConvReg`` from ``(C, H, W)`` of the student's map to the teacher's."""
    if len(student_shape) != 3 or len(teacher_shape) != 3:
        raise ValueError(
            f"FitNet needs [C, H, W] maps; got student {tuple(student_shape)} and teacher "
            f"{tuple(teacher_shape)}"
        )
    (s_c, s_h, s_w), (t_c, t_h, t_w) = student_shape, teacher_shape
    if s_h == 2 * t_h:
        conv: nn.Module = nn.Conv2d(s_c, t_c, 3, stride=2, padding=1)
    elif s_h * 2 == t_h:
        conv = nn.ConvTranspose2d(s_c, t_c, 4, stride=2, padding=1)
    elif s_h >= t_h and s_w >= t_w:
        conv = nn.Conv2d(s_c, t_c, (1 + s_h - t_h, 1 + s_w - t_w))
    else:
        raise ValueError(
            f"FitNet's regressor cannot map the student's {tuple(student_shape)} map to the "
            f"teacher's {tuple(teacher_shape)} (student smaller, not half); hint a layer whose "
            "map is at least as large as the teacher's"
        )
    return nn.Sequential(conv, nn.BatchNorm2d(t_c), nn.ReLU())


@register_feature_loss("fitnet")
class FitNet(FeatureLoss):
    """``MSE(regressor(F_s), F_t)`` (mean) summed over taps (weight 100, the middle stage)."""

    weight = 100.0
    reads = "middle"

    def __init__(self, student_shapes: Shapes, teacher_shapes: Shapes) -> None:
        super().__init__()
        self._names = storage_names(student_shapes)
        self.regressors = nn.ModuleDict(
            {
                name: conv_regressor(tuple(student_shapes[tap]), tuple(teacher_shapes[tap]))
                for tap, name in self._names.items()
            }
        )

    @classmethod
    def build(cls, student_shapes: Shapes, teacher_shapes: Shapes, context: BuildContext,
              **options: Any) -> FitNet:  # fmt: skip
        return cls(student_shapes, teacher_shapes)

    def forward(
        self,
        student_features: Mapping[str, Tensor],
        teacher_features: Mapping[str, Tensor],
        *,
        index: Tensor | None = None,
        labels: Tensor | None = None,
    ) -> Tensor:
        taps = matching_taps(student_features, teacher_features, expected=self._names)
        terms = []
        for tap in taps:
            student, teacher = student_features[tap], teacher_features[tap].detach()
            check_maps("FitNet", student, teacher)
            hint = self.regressors[self._names[tap]](student)
            if hint.shape != teacher.shape:
                raise ValueError(
                    f"FitNet: the regressor maps the student's {tuple(student.shape)} to "
                    f"{tuple(hint.shape)}, not the teacher's {tuple(teacher.shape)}; build it "
                    "from the shapes you feed it"
                )
            terms.append(F.mse_loss(hint, teacher))
        return torch.stack(terms).sum()
