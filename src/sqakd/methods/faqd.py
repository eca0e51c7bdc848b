"""FAQD (Li, Yang, Yin, Qi & Xin, IEEE Access 2023): label-free QAT from the teacher's logits and
the pairwise affinities between spatial positions of its intermediate feature maps.

loss = logit_weight * logit_loss(student, teacher)
     + affinity_weight * sum over taps of FA(adapter(student map), teacher map)
     + label_weight * CE(student, labels)

- taps: ``method.layers`` (default ``stages``: the model's registered stage outputs, FAQD's
  ``f1, f2, f3`` for the CIFAR ResNets; a user model names its modules); a student of its own
  architecture (``student.name``, FAQD's released ResNet-110 -> ResNet-20) is tapped at its own
  stages, paired in order with the teacher's;
- adapters: FAQD's per-tap 1x1 convolution with bias (student channels -> teacher channels),
  then ReLU, on the student's maps only,
  trained in their own group (``adapters``; ``train.optimizers.adapters``, else the student's
  weight settings);
- affinity: ``fa`` (exact, an N x N tensor per image) or ``ffa`` (random projections, cost linear
  in N; the projection is a buffer, so checkpoints restore it); both summed over the batch as
  released, so the released weight 0.1 means what it meant there (about 0.1 B against the
  batch-mean logit loss);
- logit loss: ``mse`` on logits (released default) or ``kl`` (T^2 KL with ``temperature``, T = 5
  in the released CIFAR full-quantization scripts; ours is a batch mean, the released one a batch
  sum);
- labels: weight 0 by default (label-free, as the README's runs); the released default 0.3 is an
  option (``method.label_weight: 0.3``), and then labels are read.

Where the released code and the paper's intent differ, this implements the intent: the adapters
train (the released weight-only scripts never optimise them), the FFA projection comes from a
private generator (the released code reseeds the global RNG on every call, which freezes every
epoch's shuffle and augmentation), and the normalisation has its eps. The student is any
quantizer of the library (the released code has its own weight projections; ``binary`` and
``ternary`` here), prepared from a copy of the teacher.
"""

from __future__ import annotations

import copy
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor, nn

from ..distill import (
    FastFeatureAffinity,
    FeatureAdapters,
    FeatureAffinity,
    FeatureTaps,
    kd_kl_divergence,
)
from ..models import resolve_tap_names
from .base import Batch, DataShapes, Method, Models, Needs, Phase, register_method


class FAQDOptions(BaseModel):
    """FAQD's keys under ``method:``."""

    model_config = ConfigDict(extra="forbid")

    layers: Literal["stages"] | list[str] = "stages"
    affinity: Literal["fa", "ffa"] = "fa"
    affinity_weight: float = Field(0.1, ge=0)  # 0: the logit-only ablation
    order: Literal[1, 2] = 1
    projections: int = Field(15, ge=1)  # FFA's k
    projection_seed: int = 0
    adapters: bool = True
    logit_loss: Literal["mse", "kl"] = "mse"
    logit_weight: float = Field(1.0, ge=0)
    temperature: float = Field(5.0, gt=0)
    label_weight: float = Field(0.0, ge=0)


@register_method("faqd")
class FAQD(Method):
    label = "FAQD (no labels)"
    Options = FAQDOptions
    options: FAQDOptions

    @property
    def needs(self) -> Needs:  # type: ignore[override]
        return Needs(
            labels=self.options.label_weight > 0,
            teacher="features",
            label_free_setting="method.label_weight=0",
        )

    def setup(self, models: Models, shapes: DataShapes) -> None:
        cfg = self.options
        if cfg.affinity_weight == 0 and cfg.logit_weight == 0 and cfg.label_weight == 0:
            raise ValueError("method.affinity_weight, logit_weight and label_weight are all 0")
        assert models.teacher is not None
        teacher_taps = resolve_tap_names(cfg.layers, shapes.model_name)
        student_taps = resolve_tap_names(cfg.layers, shapes.student_model)
        if len(student_taps) != len(teacher_taps):
            raise ValueError(
                f"the student has {len(student_taps)} taps ({', '.join(student_taps)}) and the "
                f"teacher {len(teacher_taps)} ({', '.join(teacher_taps)}); name as many of each"
            )
        # the loss pairs the i-th student tap with the i-th teacher tap, under the teacher's name
        self.taps, self.student_names = teacher_taps, dict(zip(teacher_taps, student_taps))
        self.student_taps = FeatureTaps(models.student, student_taps)
        self.teacher_taps = FeatureTaps(models.teacher, teacher_taps)
        image = torch.zeros(1, *shapes.image_shape, device=next(models.teacher.parameters()).device)
        with torch.no_grad():
            _, maps = self.teacher_taps(image)
            # the student's maps from a throw-away copy: the student itself is not calibrated yet
            probe = copy.deepcopy(models.student).eval()
            _, student_maps = FeatureTaps(probe, student_taps)(image)
        channels = {tap: int(student_maps[self.student_names[tap]].shape[1]) for tap in self.taps}
        teacher_channels = {tap: int(maps[tap].shape[1]) for tap in self.taps}
        self.adapters = FeatureAdapters(channels, teacher_channels) if cfg.adapters else None
        positions = {
            tap: int(student_maps[self.student_names[tap]][0, 0].numel()) for tap in self.taps
        }
        self.affinity: nn.Module = (
            FastFeatureAffinity(positions, cfg.projections, cfg.projection_seed, cfg.order)
            if cfg.affinity == "ffa"
            else FeatureAffinity(cfg.order)
        )

    def losses(self, models: Models, batch: Batch, phase: Phase) -> dict[str, Tensor]:
        cfg = self.options
        logits = models.student(batch.images)
        tapped = self.student_taps.features
        student_maps = {tap: tapped[name] for tap, name in self.student_names.items()}
        with torch.no_grad():
            teacher_logits, teacher_maps = self.teacher_taps(batch.images)
        losses: dict[str, Tensor] = {}
        if cfg.logit_weight > 0:
            if cfg.logit_loss == "mse":
                logit = F.mse_loss(logits, teacher_logits)
            else:
                logit = kd_kl_divergence(logits, teacher_logits, cfg.temperature)
            losses[cfg.logit_loss] = cfg.logit_weight * logit
        if cfg.affinity_weight > 0:
            if self.adapters is not None:
                student_maps = self.adapters(student_maps)
            losses[cfg.affinity] = cfg.affinity_weight * self.affinity(student_maps, teacher_maps)
        if cfg.label_weight > 0:
            losses["ce"] = cfg.label_weight * F.cross_entropy(logits, batch.labels)
        return losses
