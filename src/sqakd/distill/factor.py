"""Factor transfer (FT; Kim et al. 2018) as the SQAKD Table-7 zoo computes it.

On the last stage's map: a **paraphraser** (an auto-encoder on the teacher's map: encoder
``conv3x3 C -> C -> C/2 -> C/2`` with LeakyReLU(0.1) after each, decoder of mirrored transposed
convolutions, no BatchNorm) is first trained to reconstruct the teacher's map (mean squared
error) for a 30-epoch pre-stage (released: SGD lr 0.01, momentum 0.9) and then **frozen**; a
**translator** (the same encoder shape from the student's channels, with BatchNorm) trains with
the student. With the factor ``phi(x) = normalize(mean_c x**2)`` (flattened, L2-normalised per
sample), the loss is ``mean |phi(translator(F_s)) - phi(encoder(F_t))|`` (L1, a mean over batch
and positions), summed over taps; the larger map is adaptive-average pooled first.

**Released form vs the paper**: the paper's factor is the encoder output flattened and
L2-normalised; the released code takes the channel mean of squares first (as AT does). Weight
200.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ._features import check_maps, matching_taps, pool_to_common, storage_names
from .feature_registry import BuildContext, FeatureLoss, Shapes, register_feature_loss

#: the factor's channels as a fraction of the teacher's (released ``k = 0.5``)
RATE = 0.5


def _encoder(in_channels: int, middle: int, out: int, batch_norm: bool) -> nn.Sequential:
    layers: list[nn.Module] = []
    for c_in, c_out in ((in_channels, middle), (middle, out), (out, out)):
        layers.append(nn.Conv2d(c_in, c_out, 3, padding=1))
        if batch_norm:
            layers.append(nn.BatchNorm2d(c_out))
        layers.append(nn.LeakyReLU(0.1))
    return nn.Sequential(*layers)


class Paraphraser(nn.Module):
    """The teacher-side auto-encoder: ``encoder`` gives the factor's map, ``decoder`` rebuilds
    the teacher's map from it."""

    def __init__(self, channels: int, rate: float = RATE) -> None:
        super().__init__()
        factor = max(1, int(channels * rate))
        self.encoder = _encoder(channels, channels, factor, batch_norm=False)
        self.decoder = nn.Sequential(
            nn.ConvTranspose2d(factor, factor, 3, padding=1), nn.LeakyReLU(0.1),
            nn.ConvTranspose2d(factor, channels, 3, padding=1), nn.LeakyReLU(0.1),
            nn.ConvTranspose2d(channels, channels, 3, padding=1), nn.LeakyReLU(0.1),
        )  # fmt: skip

    def forward(self, teacher_map: Tensor) -> Tensor:
        return self.decoder(self.encoder(teacher_map))


def factor(feature_map: Tensor) -> Tensor:
    """``[B, C, H, W] -> [B, H W]``: the channel mean of squares, L2-normalised per sample."""
    return F.normalize(feature_map.pow(2).mean(1).flatten(1), dim=1)


@register_feature_loss("ft")
class FactorTransfer(FeatureLoss):
    """FT with a pre-trained, then frozen paraphraser and a trainable translator (weight 200,
    the last stage, 30-epoch pre-stage training group ``paraphraser``)."""

    weight = 200.0
    reads = "last"
    pre_epochs = 30
    pre_trains = "own"
    pre_group = "paraphraser"
    pre_optimizer = {"name": "sgd", "lr": 0.01, "momentum": 0.9, "schedule": "constant"}

    def __init__(
        self, student_channels: Mapping[str, int], teacher_channels: Mapping[str, int]
    ) -> None:
        super().__init__()
        self._names = storage_names(student_channels)
        self.paraphrasers = nn.ModuleDict(
            {name: Paraphraser(teacher_channels[tap]) for tap, name in self._names.items()}
        )
        self.translators = nn.ModuleDict(
            {
                name: _encoder(student_channels[tap], student_channels[tap],
                               max(1, int(teacher_channels[tap] * RATE)), batch_norm=True)
                for tap, name in self._names.items()
            }
        )  # fmt: skip

    @classmethod
    def build(cls, student_shapes: Shapes, teacher_shapes: Shapes, context: BuildContext,
              **options: Any) -> FactorTransfer:  # fmt: skip
        return cls(
            {tap: int(shape[0]) for tap, shape in student_shapes.items()},
            {tap: int(shape[0]) for tap, shape in teacher_shapes.items()},
        )

    def pre_stage_modules(self) -> list[nn.Module]:
        return [self.paraphrasers]

    def pre_stage_loss(self, student_features, teacher_features) -> Tensor:
        """Reconstruction of the teacher's map by the paraphraser (MSE, a mean), summed over taps."""
        terms = []
        for tap, name in self._names.items():
            teacher = teacher_features[tap].detach()
            terms.append(F.mse_loss(self.paraphrasers[name](teacher), teacher))
        return torch.stack(terms).sum()

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
            name = self._names[tap]
            check_maps("FT", student_features[tap], teacher_features[tap])
            student = self.translators[name](student_features[tap])
            with torch.no_grad():  # the paraphraser is frozen after its pre-stage
                teacher = self.paraphrasers[name].encoder(teacher_features[tap])
            student, teacher = pool_to_common(student, teacher)
            terms.append((factor(student) - factor(teacher)).abs().mean())
        return torch.stack(terms).sum()
