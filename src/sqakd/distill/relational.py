"""Relational losses of the SQAKD Table-7 zoo: SP, RKD and CC, all comparing relations between
the samples of a batch (so neither needs the student's and teacher's channels to match).

- **SP** (similarity preserving; Tung & Mori 2019), on the last stage's map: per tap ``G = f f^T``
  (``[B, B]``, ``f`` the flattened map), each row L2-normalised; loss
  ``||G_t - G_s||_F**2 / B**2``. Weight 3000.
- **RKD** (relational KD; Park et al. 2019), on the embedding (the classifier's input): distance
  term: pairwise Euclidean distances (squared distances clamped at ``1e-12`` before the root, the
  diagonal set to 0), each matrix divided by the mean of its positive entries, compared by
  smooth-L1 (mean); angle term: the cosines of every pair of difference vectors from each anchor
  (``[B, B, B]``), smooth-L1 (mean); loss ``25 * distance + 50 * angle`` (teacher parts without
  gradient). Weight 1 (in the released ResNet-20 script the RKD branch is unreachable, since
  its test compares against a path with a leading space).
- **CC** (correlation congruence; Peng et al. 2019) as RepDistiller computes it, on the
  embedding: both embeddings pass through their own trainable ``Linear(D, 128)`` (no
  normalisation), ``d = |e_s - e_t|`` and the loss is ``mean_i sum_k d_ik d_(i+1)k`` over
  consecutive samples of the batch. **Released form vs the paper**: the paper matches
  Gaussian-kernel correlation matrices between samples; this product of consecutive differences
  is what the released code computes (>= 0, 0 when the embeddings agree). Weight 0.02.

Every term is a batch **mean** (SP: divided by ``B**2``); taps' terms are summed.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ._features import check_maps, matching_taps, storage_names
from .feature_registry import BuildContext, FeatureLoss, Shapes, TapwiseLoss, register_feature_loss


# ----------------------------------------------------------------------------------------- SP
def similarity_matrix(feature_map: Tensor) -> Tensor:
    """``[B, ...] -> [B, B]``: ``f f^T`` of the flattened features, rows L2-normalised."""
    flat = feature_map.flatten(1)
    return F.normalize(flat @ flat.t(), dim=1)


def similarity_preserving_loss(student_map: Tensor, teacher_map: Tensor) -> Tensor:
    """``||G_t - G_s||_F**2 / B**2`` for one pair (teacher treated as constant)."""
    if student_map.shape[0] != teacher_map.shape[0]:
        raise ValueError(
            f"SP: student {tuple(student_map.shape)} and teacher {tuple(teacher_map.shape)} "
            "differ in batch size"
        )
    batch = student_map.shape[0]
    difference = similarity_matrix(teacher_map.detach()) - similarity_matrix(student_map)
    return difference.pow(2).sum() / batch**2


@register_feature_loss("sp")
class SimilarityPreserving(TapwiseLoss):
    """:func:`similarity_preserving_loss` summed over taps (weight 3000, the last stage)."""

    weight = 3000.0
    reads = "last"

    def pair(self, student_map: Tensor, teacher_map: Tensor) -> Tensor:
        return similarity_preserving_loss(student_map, teacher_map)


# ---------------------------------------------------------------------------------------- RKD
def pairwise_distances(embedding: Tensor, eps: float = 1e-12) -> Tensor:
    """``[B, D] -> [B, B]`` Euclidean distances; squared ones clamped at ``eps``, diagonal 0."""
    squared = embedding.pow(2).sum(1)
    product = embedding @ embedding.t()
    distances = (squared.unsqueeze(1) + squared.unsqueeze(0) - 2 * product).clamp(min=eps).sqrt()
    distances = distances.clone()
    distances[range(len(embedding)), range(len(embedding))] = 0
    return distances


def _normalised_distances(embedding: Tensor) -> Tensor:
    distances = pairwise_distances(embedding)
    return distances / distances[distances > 0].mean()


def _angles(embedding: Tensor) -> Tensor:
    """``[B, D] -> [B * B * B]``: cosines between ``e_j - e_i`` and ``e_k - e_i`` per anchor i."""
    differences = F.normalize(embedding.unsqueeze(0) - embedding.unsqueeze(1), p=2, dim=2)
    return (differences @ differences.transpose(1, 2)).flatten()


def rkd_loss(
    student: Tensor, teacher: Tensor, distance_weight: float = 25.0, angle_weight: float = 50.0
) -> Tensor:
    """``distance_weight * distance + angle_weight * angle`` (see the module docstring)."""
    check_maps("RKD", student, teacher, dims=2)
    with torch.no_grad():
        teacher_distances = _normalised_distances(teacher)
        teacher_angles = _angles(teacher)
    distance = F.smooth_l1_loss(_normalised_distances(student), teacher_distances)
    angle = F.smooth_l1_loss(_angles(student), teacher_angles)
    return distance_weight * distance + angle_weight * angle


@register_feature_loss("rkd")
class RelationalKD(TapwiseLoss):
    """:func:`rkd_loss` summed over taps (weight 1; distance 25, angle 50; the embedding)."""

    weight = 1.0
    reads = "embedding"
    option_names = ("distance_weight", "angle_weight")

    def __init__(self, distance_weight: float = 25.0, angle_weight: float = 50.0) -> None:
        super().__init__()
        self.distance_weight, self.angle_weight = distance_weight, angle_weight

    def pair(self, student_map: Tensor, teacher_map: Tensor) -> Tensor:
        return rkd_loss(
            student_map.flatten(1), teacher_map.flatten(1), self.distance_weight, self.angle_weight
        )


# ----------------------------------------------------------------------------------------- CC
def correlation_congruence_loss(student_embedding: Tensor, teacher_embedding: Tensor) -> Tensor:
    """``mean_i sum_k d_ik d_(i+1)k`` with ``d = |e_s - e_t|`` (RepDistiller's CC)."""
    check_maps("CC", student_embedding, teacher_embedding, dims=2)
    if student_embedding.shape != teacher_embedding.shape:
        raise ValueError(
            f"CC: student embedding {tuple(student_embedding.shape)} and teacher embedding "
            f"{tuple(teacher_embedding.shape)} differ; embed both to the same size"
        )
    delta = (student_embedding - teacher_embedding).abs()
    return (delta[:-1] * delta[1:]).sum(1).mean()


class _EmbeddingPairs(FeatureLoss):
    """A loss with one trainable linear embedding per tap for each of student and teacher."""

    def __init__(self, student_dims: Mapping[str, int], teacher_dims: Mapping[str, int],
                 embed_dim: int) -> None:  # fmt: skip
        super().__init__()
        self._names = storage_names(student_dims)
        self.embed_student = nn.ModuleDict(
            {name: nn.Linear(student_dims[tap], embed_dim) for tap, name in self._names.items()}
        )
        self.embed_teacher = nn.ModuleDict(
            {name: nn.Linear(teacher_dims[tap], embed_dim) for tap, name in self._names.items()}
        )

    @classmethod
    def build(cls, student_shapes: Shapes, teacher_shapes: Shapes, context: BuildContext,
              **options: Any):  # fmt: skip
        student = {tap: _flat_size(shape) for tap, shape in student_shapes.items()}
        teacher = {tap: _flat_size(shape) for tap, shape in teacher_shapes.items()}
        return cls(student, teacher, **options)

    def embed(self, tap: str, student: Tensor, teacher: Tensor) -> tuple[Tensor, Tensor]:
        name = self._names[tap]
        return (
            self.embed_student[name](student.flatten(1)),
            self.embed_teacher[name](teacher.detach().flatten(1)),
        )


def _flat_size(shape: tuple[int, ...]) -> int:
    size = 1
    for dim in shape:
        size *= int(dim)
    return size


@register_feature_loss("cc")
class CorrelationCongruence(_EmbeddingPairs):
    """:func:`correlation_congruence_loss` of the two trainable embeddings, summed over taps
    (weight 0.02, the embedding). The embeddings are the loss's own parameters (both trainable,
    as released), so the teacher's side moves too; the frozen teacher never does."""

    weight = 0.02
    reads = "embedding"
    option_names = ("embed_dim",)

    def __init__(self, student_dims: Mapping[str, int], teacher_dims: Mapping[str, int],
                 embed_dim: int = 128) -> None:  # fmt: skip
        super().__init__(student_dims, teacher_dims, embed_dim)

    def forward(self, student_features, teacher_features, *, index=None, labels=None) -> Tensor:
        taps = matching_taps(student_features, teacher_features, expected=self._names)
        terms = []
        for tap in taps:
            student, teacher = self.embed(tap, student_features[tap], teacher_features[tap])
            terms.append(correlation_congruence_loss(student, teacher))
        return torch.stack(terms).sum()
