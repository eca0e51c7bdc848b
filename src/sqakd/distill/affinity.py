"""FAQD's feature-affinity losses (Li et al. 2023): FA and its random-projection estimate FFA.

For a map ``F`` of shape ``[B, C, H, W]`` flattened to ``[B, C, N]`` (``N = H W``) with every
spatial position's channel vector divided by its L2 norm plus ``1e-5``, the affinity
``A = F^T F`` (``[B, N, N]``) holds the cosine similarities between positions. FA compares the
student's and teacher's affinities; channel counts do not enter ``A``, but both maps of a pair
must have the same channel count here (FAQD's adapters are C -> C, so a mismatch means the taps
are paired wrongly). The teacher map is resized to the student's spatial size (bilinear,
``align_corners=True``) and treated as a constant.

**Reductions (as released): both losses SUM over the batch** and normalise by ``N**2`` (or ``N``
for order 2), so a loss weight means "per sample" and doubling the batch doubles the loss. FAQD's
default weight 0.1 on the FA terms, next to batch-mean logit losses, is effectively ``0.1 * B``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ._features import matching_taps, storage_names
from .float32 import computed_in_float32

#: added to each position's L2 norm before dividing (the released FA has it; its FFA did not)
NORM_EPS = 1e-5
#: the released number of random projections (``num_ensemble``)
DEFAULT_PROJECTIONS = 15


def _check_order(order: int) -> None:
    if order not in (1, 2):
        raise ValueError(f"order must be 1 (L1, the released default) or 2 (L2), got {order!r}")


def _check_pair(student_map: Tensor, teacher_map: Tensor) -> None:
    s, t = tuple(student_map.shape), tuple(teacher_map.shape)
    if student_map.dim() != 4 or teacher_map.dim() != 4:
        raise ValueError(f"feature maps must be [B, C, H, W]; got student {s}, teacher {t}")
    if s[0] != t[0]:
        raise ValueError(
            f"student map {s} and teacher map {t} differ in batch size; feed both the same images"
        )
    if s[1] != t[1]:
        raise ValueError(
            f"student map {s} and teacher map {t} differ in channels ({s[1]} vs {t[1]}); "
            "pair taps of the same stage"
        )


def normalized_positions(feature_map: Tensor, size: tuple[int, int]) -> Tensor:
    """``[B, C, H, W] -> [B, C, N]`` at spatial ``size`` (bilinear, ``align_corners=True`` when it
    differs), each position's channel vector divided by ``its L2 norm + 1e-5``."""
    if tuple(feature_map.shape[-2:]) != tuple(size):
        feature_map = F.interpolate(feature_map, size=size, mode="bilinear", align_corners=True)
    flat = feature_map.flatten(2)
    return flat / (torch.linalg.vector_norm(flat, dim=1, keepdim=True) + NORM_EPS)


def _normalized_pair(student_map: Tensor, teacher_map: Tensor) -> tuple[Tensor, Tensor]:
    _check_pair(student_map, teacher_map)
    size = (student_map.shape[-2], student_map.shape[-1])
    return normalized_positions(student_map, size), normalized_positions(teacher_map.detach(), size)


def feature_affinity_loss(student_map: Tensor, teacher_map: Tensor, order: int = 1) -> Tensor:
    """FA between one student map ``[B, C, h, w]`` and one teacher map ``[B, C, H, W]``.

    With ``D = A_s - A_t`` (``[B, N, N]``, ``N = h w``, see the module docstring):

    - ``order=1`` (released default): ``sum_b sum_ij |D_bij| / N**2``, i.e. the mean absolute
      affinity difference per sample, **summed over the batch**;
    - ``order=2``: ``||D||_F / N``, the Frobenius norm of the **whole** ``[B, N, N]`` difference
      (one norm over batch and positions, as released), so it grows like ``sqrt(B)``.

    Materialises ``[B, N, N]`` tensors: memory grows with ``N**2`` (see
    :func:`fast_feature_affinity_loss`). Gradients reach the student map only.
    """
    _check_order(order)
    student, teacher = _normalized_pair(student_map, teacher_map)
    n = student.shape[-1]
    difference = student.transpose(1, 2) @ student - teacher.transpose(1, 2) @ teacher
    if order == 1:
        return difference.abs().sum() / n**2
    return torch.linalg.vector_norm(difference) / n


def _project(positions: Tensor, projection: Tensor) -> Tensor:
    """``F^T (F V)``, right to left: ``[B, C, N] x [N, k] -> [B, C, k] -> [B, N, k]``, O(B N C k)."""
    return positions.transpose(1, 2) @ (positions @ projection)


def fast_feature_affinity_loss(
    student_map: Tensor, teacher_map: Tensor, projection: Tensor, order: int = 1
) -> Tensor:
    """FFA: FA estimated through ``k`` random projections, without any ``[N, N]`` tensor.

    ``projection`` is ``V``, ``[N, k]`` with i.i.d. N(0, 1) entries (``N = h w`` of the student
    map), shared by the batch. ``P = F^T (F V)`` is computed right to left (O(B N C k)) and
    ``E = P_s - P_t = (A_s - A_t) V`` (``[B, N, k]``).

    - ``order=1`` (released default): ``sum_b mean_k sum_i |E_bik| / N**2``. This is *not* an
      estimate of FA order 1: ``E|(D V)_ik| = sqrt(2/pi) ||D_i.||_2``, so it estimates
      ``sqrt(2/pi) sum_b sum_i ||D_bi.||_2 / N**2`` (row L2 norms, summed), a different quantity.
    - ``order=2``: ``sqrt(sum_b mean_k sum_i E_bik**2) / N``. Because ``E[V V^T] = k I``,
      ``E[||D V||_F**2 / k] = ||D||_F**2``: the mean over the ``k`` projections (division by
      ``k``, as released) makes the **square** of this loss an unbiased estimate of the square
      of FA order 2 (``||D||_F**2 / N**2``); the loss itself is consistent, with a relative
      error of order ``1 / sqrt(2 k)`` at most (slightly low on average, by Jensen).

    **Reductions**: summed over the batch as FA is (order 2: one norm over the whole tensor).
    The normalisation adds ``1e-5`` to each position's norm (the released FFA did not, dividing
    by zero at all-zero positions after a ReLU), so FFA order 2 estimates the order-2
    :func:`feature_affinity_loss` of the same maps exactly as stated above.
    """
    _check_order(order)
    student, teacher = _normalized_pair(student_map, teacher_map)
    n = student.shape[-1]
    if projection.dim() != 2 or projection.shape[0] != n:
        raise ValueError(
            f"projection {tuple(projection.shape)} does not fit N = {n} positions of student map "
            f"{tuple(student_map.shape)}; make it [{n}, k] (FastFeatureAffinity positions[tap] = h*w)"
        )
    projection = projection.to(student.dtype)
    k = projection.shape[1]
    difference = _project(student, projection) - _project(teacher, projection)
    if order == 1:
        return difference.abs().sum() / (k * n**2)
    return torch.linalg.vector_norm(difference) / (math.sqrt(k) * n)


def gaussian_projection(positions: int, k: int = DEFAULT_PROJECTIONS, seed: int = 0) -> Tensor:
    """``[positions, k]`` i.i.d. N(0, 1) from a private generator seeded with ``seed``: the same
    matrix for the same ``(positions, k, seed)``; the global RNG is neither read nor advanced."""
    if positions < 1 or k < 1:
        raise ValueError(f"need positions >= 1 and k >= 1, got positions={positions}, k={k}")
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(positions, k, generator=generator)


class FeatureAffinity(nn.Module):
    """:func:`feature_affinity_loss` summed over a set of taps.

    ``forward(student_features, teacher_features)`` takes two dicts ``{tap name: [B, C, H, W]}``
    with the same keys (student maps after their adapters) and returns
    ``sum over taps of FA(student[tap], teacher[tap])``, each term summed over the batch.
    """

    def __init__(self, order: int = 1) -> None:
        super().__init__()
        _check_order(order)
        self.order = order

    @computed_in_float32
    def forward(
        self, student_features: Mapping[str, Tensor], teacher_features: Mapping[str, Tensor]
    ) -> Tensor:
        taps = matching_taps(student_features, teacher_features)
        terms = [
            feature_affinity_loss(student_features[tap], teacher_features[tap], self.order)
            for tap in taps
        ]
        return torch.stack(terms).sum()

    def extra_repr(self) -> str:
        return f"order={self.order}"


class FastFeatureAffinity(nn.Module):
    """:func:`fast_feature_affinity_loss` summed over a set of taps, with fixed projections.

    ``positions`` maps each tap name to ``N = h w`` of its **student** map (the teacher map is
    resized to it). One ``[N, k]`` Gaussian matrix per tap is drawn at construction from a
    private generator seeded with ``seed`` (taps with equal ``N`` get the same matrix, as in the
    released code) and kept as a buffer, so checkpoints restore it; ``torch.manual_seed`` neither
    changes it nor is changed by it. Buffer names are the tap names with ``.`` -> ``/``
    (``projections.layer1/0``).

    ``forward(student_features, teacher_features)``: dicts ``{tap name: [B, C, H, W]}`` with the
    keys of ``positions``; returns the sum over taps, each term summed over the batch.
    """

    def __init__(
        self,
        positions: Mapping[str, int],
        k: int = DEFAULT_PROJECTIONS,
        seed: int = 0,
        order: int = 1,
    ) -> None:
        super().__init__()
        _check_order(order)
        if not positions:
            raise ValueError("positions is empty; give {tap name: h*w of the student map}")
        self.order, self.k, self.seed = order, k, seed
        self._names = storage_names(positions)
        self.projections = nn.Module()
        for tap, name in self._names.items():
            self.projections.register_buffer(name, gaussian_projection(positions[tap], k, seed))

    def projection(self, tap: str) -> Tensor:
        """The ``[N, k]`` matrix of ``tap``."""
        return self.projections.get_buffer(self._names[tap])

    @computed_in_float32
    def forward(
        self, student_features: Mapping[str, Tensor], teacher_features: Mapping[str, Tensor]
    ) -> Tensor:
        taps = matching_taps(student_features, teacher_features, expected=self._names)
        terms = [
            fast_feature_affinity_loss(
                student_features[tap], teacher_features[tap], self.projection(tap), self.order
            )
            for tap in taps
        ]
        return torch.stack(terms).sum()

    def extra_repr(self) -> str:
        sizes = {tap: self.projection(tap).shape[0] for tap in self._names}
        return f"positions={sizes}, k={self.k}, seed={self.seed}, order={self.order}"
