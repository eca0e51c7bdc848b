"""Helpers shared by the feature losses: dictionaries of tapped maps keyed by tap name."""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from torch import Tensor


def storage_name(tap: str) -> str:
    """The name a per-tap submodule or buffer is stored under: the tap name with ``.`` -> ``/``.

    Tap names are module names (``layer1.0``), but PyTorch forbids ``.`` in child and buffer
    names; ``/`` keeps the checkpoint key readable (``adapters.layer1/0.0.weight``).
    """
    return tap.replace(".", "/")


def storage_names(taps: Iterable[str]) -> dict[str, str]:
    """``{tap: storage_name(tap)}``; two taps that would share a name are an error."""
    names: dict[str, str] = {}
    for tap in taps:
        name = storage_name(tap)
        if name in names.values():
            raise ValueError(f"taps {tap!r} and another one both store as {name!r}; rename one")
        names[tap] = name
    return names


def matching_taps(
    student_features: Mapping[str, Tensor],
    teacher_features: Mapping[str, Tensor],
    expected: Iterable[str] | None = None,
) -> list[str]:
    """The tap names, checked: both dictionaries (and ``expected``, when given) name the same taps."""
    for role, features in (("student", student_features), ("teacher", teacher_features)):
        if not isinstance(features, Mapping):
            raise TypeError(
                f"{role} features must be a dict {{tap name: [B, C, H, W] map}}, "
                f"got {type(features).__name__}; a feature loss is called on tapped features"
            )
    student, teacher = set(student_features), set(teacher_features)
    if student != teacher:
        raise ValueError(
            f"student taps {sorted(student)} and teacher taps {sorted(teacher)} differ; "
            "tap the same names in both models"
        )
    if not student:
        raise ValueError("no feature maps given; tap at least one module in both models")
    if expected is not None and student != set(expected):
        raise ValueError(
            f"features for taps {sorted(student)} but the loss was built for {sorted(expected)}; "
            "build it with the taps you feed it"
        )
    return list(student_features)


def pool_to_common(student_map: Tensor, teacher_map: Tensor) -> tuple[Tensor, Tensor]:
    """Both maps at the smaller of their two spatial sizes: the larger one is adaptive-average
    pooled (as the released zoo does when the heights differ)."""
    import torch.nn.functional as F

    s_size, t_size = tuple(student_map.shape[-2:]), tuple(teacher_map.shape[-2:])
    if s_size == t_size:
        return student_map, teacher_map
    if s_size[0] > t_size[0]:
        return F.adaptive_avg_pool2d(student_map, t_size), teacher_map
    return student_map, F.adaptive_avg_pool2d(teacher_map, s_size)


def check_maps(loss: str, student_map: Tensor, teacher_map: Tensor, dims: int = 4) -> None:
    """One line when a pair of tapped tensors cannot be compared (rank or batch size)."""
    s, t = tuple(student_map.shape), tuple(teacher_map.shape)
    if student_map.dim() != dims or teacher_map.dim() != dims:
        kind = "[B, C, H, W] maps" if dims == 4 else "[B, D] embeddings"
        raise ValueError(f"{loss} compares {kind}; got student {s} and teacher {t}")
    if s[0] != t[0]:
        raise ValueError(f"{loss}: student {s} and teacher {t} differ in batch size")
