"""Contrastive representation distillation (CRD; Tian et al. 2020) as the SQAKD Table-7 zoo
computes it (RepDistiller's NCE form).

On the embedding (the classifier's input), student and teacher each pass through their own
trainable ``Linear(D, 128)`` followed by L2 normalisation (``v_s``, ``v_t``). Two memory banks,
``[n, 128]`` for the ``n`` training samples (uniform in ``+-1/sqrt(128/3)`` at start, from a
private generator), hold a running embedding of every sample: after each training step the rows
of the batch's indices become ``normalize(0.5 * row + 0.5 * v)`` (momentum 0.5), student's bank
from ``v_s``, teacher's from ``v_t``; no other row changes. For each sample, ``K`` negatives
(released 16384, drawn with replacement) and its own row (the positive) are scored:

- student anchor: ``exp(v_s . m_t[j] / T) / Z_s`` against the teacher's bank;
- teacher anchor: ``exp(v_t . m_s[j] / T) / Z_t`` against the student's bank;

``T = 0.1``; ``Z`` is fixed on the first training batch as ``mean score * n`` (then kept as a
buffer). With ``P`` a normalised score and ``Pn = 1 / n``, the NCE loss of one side is

``-(sum_b log(P_pos / (P_pos + K Pn + eps)) + sum_b,j log(K Pn / (P_neg_j + K Pn + eps))) / B``

(a batch **mean** of per-sample sums over the negatives, eps ``1e-7``); the loss is the sum of
the two sides. It has no zero: its minimum is approached as positives score high and negatives
low.

Negatives: ``sampler="class"`` (released): from samples of **other classes** (labels needed); the
released data set knows every sample's class in advance, while here a sample's class is learnt
when its batch first arrives (``row_labels``), so in the first epoch not-yet-seen samples may be
drawn whatever their class. ``sampler="instance"`` (label-free): any other sample. Draws come
from a private generator seeded by ``(seed, number of steps so far)``, a buffer, so a resumed
run draws the same negatives.

**Released form vs the paper**: T = 0.1 (the paper and RepDistiller use 0.07); the teacher side's
embedding trains too. Weight 0.8.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ._features import check_maps, matching_taps
from .feature_registry import BuildContext, FeatureLoss, Shapes, register_feature_loss

NCE_EPS = 1e-7


def nce_loss(scores: Tensor, negatives: int, train_size: int) -> Tensor:
    """RepDistiller's NCE loss of ``[B, 1 + K]`` normalised scores (column 0: the positive)."""
    noise = negatives / train_size  # K * Pn
    positive = scores[:, 0]
    log_positive = torch.log(positive / (positive + noise + NCE_EPS))
    log_negative = torch.log(noise / (scores[:, 1:] + noise + NCE_EPS))
    return -(log_positive.sum() + log_negative.sum()) / scores.shape[0]


@register_feature_loss("crd")
class ContrastiveRepresentation(FeatureLoss):
    """CRD with memory banks (see the module docstring); weight 0.8, the embedding."""

    weight = 0.8
    reads = "embedding"
    needs_index = True
    option_names = ("embed_dim", "negatives", "temperature", "momentum", "sampler", "seed")

    @classmethod
    def needs_labels(cls, labels: bool, **options: Any) -> bool:
        sampler = options.get("sampler", "auto")
        return sampler == "class" or (sampler == "auto" and labels)

    def __init__(
        self,
        student_dim: int,
        teacher_dim: int,
        train_size: int,
        embed_dim: int = 128,
        negatives: int = 16384,
        temperature: float = 0.1,
        momentum: float = 0.5,
        sampler: Literal["class", "instance"] = "class",
        seed: int = 0,
    ) -> None:
        super().__init__()
        if train_size < 2:
            raise ValueError(
                f"CRD keeps one memory-bank row per training sample but the training set has "
                f"{train_size}; it needs a training set (DataShapes.train_size)"
            )
        if sampler not in ("class", "instance"):
            raise ValueError(f"CRD's sampler must be 'class' or 'instance', got {sampler!r}")
        self.train_size, self.negatives, self.temperature = train_size, negatives, temperature
        self.momentum, self.sampler, self.seed = momentum, sampler, seed
        self.embed_student = nn.Linear(student_dim, embed_dim)
        self.embed_teacher = nn.Linear(teacher_dim, embed_dim)
        generator = torch.Generator().manual_seed(seed)
        bound = 1 / math.sqrt(embed_dim / 3)
        for name in ("memory_student", "memory_teacher"):
            bank = torch.rand(train_size, embed_dim, generator=generator) * 2 * bound - bound
            self.register_buffer(name, bank)
        self.register_buffer("z_student", torch.tensor(-1.0))
        self.register_buffer("z_teacher", torch.tensor(-1.0))
        self.register_buffer("draws", torch.tensor(0, dtype=torch.int64))
        self.register_buffer("row_labels", torch.full((train_size,), -1, dtype=torch.int64))
        self._pending: tuple[Tensor, ...] | None = None

    @classmethod
    def build(cls, student_shapes: Shapes, teacher_shapes: Shapes, context: BuildContext,
              **options: Any) -> ContrastiveRepresentation:  # fmt: skip
        if len(student_shapes) != 1:
            raise ValueError(f"CRD reads one embedding, got taps {sorted(student_shapes)}")
        (student,), (teacher,) = student_shapes.values(), teacher_shapes.values()
        sampler = options.pop("sampler", "auto")
        if sampler == "auto":
            sampler = "class" if context.labels else "instance"
        return cls(math.prod(student), math.prod(teacher), context.train_size,
                   sampler=sampler, **options)  # fmt: skip

    # --------------------------------------------------------------------------- negatives
    def contrast_indices(self, index: Tensor, labels: Tensor | None) -> Tensor:
        """``[B, 1 + K]`` rows to score: the sample's own, then ``K`` negatives (CPU)."""
        index = index.detach().cpu().long()
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + int(self.draws))
        batch, k = len(index), self.negatives
        if self.sampler == "instance":
            draws = torch.randint(0, self.train_size - 1, (batch, k), generator=generator)
            negatives = draws + (draws >= index.unsqueeze(1)).long()  # skip the sample itself
        else:
            assert labels is not None
            labels = labels.detach().cpu().long()
            row_labels = self.row_labels.cpu()
            negatives = torch.empty(batch, k, dtype=torch.int64)
            for label in labels.unique().tolist():
                rows = labels == label
                candidates = (row_labels != label).nonzero().flatten()
                if len(candidates) == 0:
                    raise ValueError(f"CRD: no sample of another class than {label} to contrast")
                picks = torch.randint(0, len(candidates), (int(rows.sum()), k), generator=generator)
                negatives[rows] = candidates[picks]
        return torch.cat([index.unsqueeze(1), negatives], dim=1)

    # ------------------------------------------------------------------------------- loss
    def forward(
        self,
        student_features: Mapping[str, Tensor],
        teacher_features: Mapping[str, Tensor],
        *,
        index: Tensor | None = None,
        labels: Tensor | None = None,
    ) -> Tensor:
        (tap,) = matching_taps(student_features, teacher_features)
        student = student_features[tap].flatten(1)
        teacher = teacher_features[tap].detach().flatten(1)
        check_maps("CRD", student, teacher, dims=2)
        if index is None:
            raise ValueError(
                "CRD needs each sample's index (batch.index) for its memory bank: declare "
                "Needs(sample_index=True) (method feature_kd does) and pass index="
            )
        if self.sampler == "class" and labels is None:
            raise ValueError(
                "CRD draws negatives from other classes, which needs labels: set "
                "method.labels: true, or method.loss_options.crd.sampler: instance (label-free)"
            )
        device = self.memory_student.device
        index = index.to(device).long()
        if labels is not None and self.sampler == "class":
            self.row_labels[index] = labels.to(device).long()  # a sample's class never changes
        v_s = F.normalize(self.embed_student(student), dim=1)
        v_t = F.normalize(self.embed_teacher(teacher), dim=1)
        rows = self.contrast_indices(index, labels).to(device)
        student_scores = torch.exp(
            (self.memory_teacher[rows] @ v_s.unsqueeze(2)).squeeze(2) / self.temperature
        )
        teacher_scores = torch.exp(
            (self.memory_student[rows] @ v_t.unsqueeze(2)).squeeze(2) / self.temperature
        )
        z_s, z_t = self.z_student, self.z_teacher
        if z_s < 0:  # fixed on the first training batch (after_update keeps it)
            z_s = (student_scores.mean() * self.train_size).detach()
        if z_t < 0:
            z_t = (teacher_scores.mean() * self.train_size).detach()
        loss = nce_loss(student_scores / z_s, self.negatives, self.train_size) + nce_loss(
            teacher_scores / z_t, self.negatives, self.train_size
        )
        self._pending = (index, v_s.detach(), v_t.detach(), z_s, z_t)
        return loss

    @torch.no_grad()
    def after_update(self) -> None:
        """Momentum update of the batch's memory rows; fix Z; advance the negatives' draw."""
        if self._pending is None:
            return
        index, v_s, v_t, z_s, z_t = self._pending
        for bank, value in ((self.memory_student, v_s), (self.memory_teacher, v_t)):
            rows = bank[index] * self.momentum + value * (1 - self.momentum)
            bank[index] = F.normalize(rows, dim=1)
        if self.z_student < 0:
            self.z_student.fill_(float(z_s))
            self.z_teacher.fill_(float(z_t))
        self.draws += 1
        self._pending = None

    def extra_repr(self) -> str:
        return (f"samples={self.train_size}, negatives={self.negatives}, T={self.temperature}, "
                f"momentum={self.momentum}, sampler={self.sampler!r}")  # fmt: skip
