"""Feature losses compute in float32 inside an autocast (bf16) step: on bfloat16 maps, each
registered loss, RFD, FAQD's affinities and AKT's batch-norm statistics give exactly what float32
arithmetic gives on those maps upcast; and RFD in bfloat16 arithmetic would be wrong."""

from __future__ import annotations

from collections import namedtuple

import pytest
import torch
from torch import nn

from sqakd.distill import (
    FastFeatureAffinity,
    FeatureAffinity,
    RefinedFeatureDistillation,
    available_feature_losses,
    build_feature_loss,
    feature_loss_class,
)
from sqakd.distill.feature_registry import BuildContext
from sqakd.distill.float32 import computed_in_float32, upcast
from sqakd.zeroshot import BatchNormStatistics

BATCH = 8
STAGES = {"a": (8, 6, 6), "b": (16, 3, 3)}
#: feature shapes (without the batch) per ``reads`` kind
SHAPES = {
    "stages": STAGES,
    "last": {"b": (16, 3, 3)},
    "middle": {"b": (16, 3, 3)},
    "chain": {"a:input": (8, 6, 6), **STAGES},
    "embedding": {"fc:input": (16,)},
    "logits": {"logits": (10,)},
}


def maps(shapes, seed, dtype=torch.bfloat16):
    """Random non-negative maps (post-ReLU-like) of ``shapes``, rounded to ``dtype``."""
    generator = torch.Generator().manual_seed(seed)
    return {
        key: torch.rand(BATCH, *shape, generator=generator).to(dtype)
        for key, shape in shapes.items()
    }


def nearly_equal_pair(shapes):
    """A teacher's maps and a student's 3 % away, both bfloat16 (a bf16 forward's output)."""
    teacher = maps(shapes, 0, torch.float32)
    noise = maps(shapes, 1, torch.float32)
    student = {k: (v + 0.03 * (noise[k] - 0.5)).to(torch.bfloat16) for k, v in teacher.items()}
    return student, {k: v.to(torch.bfloat16) for k, v in teacher.items()}


def call(loss, student, teacher, **kwargs):
    torch.manual_seed(0)  # CRD draws negatives
    return loss(student, teacher, **kwargs)


@pytest.mark.parametrize("name", available_feature_losses())
def test_every_registered_loss_computes_in_float32_under_autocast(name):
    cls = feature_loss_class(name)
    shapes = SHAPES[cls.reads]
    torch.manual_seed(0)
    loss = build_feature_loss(
        name, shapes, shapes, BuildContext(train_size=BATCH, num_classes=10, labels=True)
    )
    student, teacher = nearly_equal_pair(shapes)
    kwargs = {"index": torch.arange(BATCH), "labels": torch.arange(BATCH) % 10}
    expected = call(loss, upcast(student), upcast(teacher), **kwargs)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = call(loss, student, teacher, **kwargs)
    assert got.dtype == torch.float32
    assert torch.equal(got, expected)
    if cls.pre_epochs:
        pre_student = None if cls.pre_trains == "own" else upcast(student)
        expected = loss.pre_stage_loss(pre_student, upcast(teacher))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            got = loss.pre_stage_loss(None if cls.pre_trains == "own" else student, teacher)
        assert torch.equal(got, expected)


@pytest.mark.parametrize(
    "loss",
    [
        RefinedFeatureDistillation(),
        FeatureAffinity(),
        FastFeatureAffinity({"a": 36, "b": 9}, k=4),
    ],
    ids=["rfd", "affinity", "fast_affinity"],
)
def test_rfd_and_affinities_compute_in_float32_under_autocast(loss):
    student, teacher = nearly_equal_pair(STAGES)
    expected = loss(upcast(student), upcast(teacher))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = loss(student, teacher)
    assert torch.equal(got, expected) and expected != 0


def test_rfd_in_bfloat16_arithmetic_would_be_wrong():
    """Why: the KL of two nearly equal attention distributions is far below bfloat16's
    resolution; computed in bfloat16 it is off by orders of magnitude (and may be negative)."""
    rfd = RefinedFeatureDistillation()
    generator = torch.Generator().manual_seed(0)
    teacher_map = torch.randn(BATCH, 64, 8, 8, generator=generator).relu()
    student_map = teacher_map + 0.5 * torch.randn(BATCH, 64, 8, 8, generator=generator)
    student, teacher = ({"a": m.to(torch.bfloat16)} for m in (student_map, teacher_map))
    exact = rfd(upcast(student), upcast(teacher))
    in_bfloat16 = sum(rfd.layer_terms(student["a"], teacher["a"]))  # undecorated: bf16 arithmetic
    assert exact > 0
    assert abs(float(in_bfloat16) - float(exact)) > 10 * float(exact)


def test_batchnorm_statistics_are_float32_for_a_bfloat16_forward():
    torch.manual_seed(0)
    model = nn.Sequential(nn.BatchNorm2d(8)).eval()
    with torch.no_grad():
        model[0].running_mean.uniform_(-0.2, 0.2)
        model[0].running_var.uniform_(0.5, 1.5)
    model.to(torch.bfloat16)
    statistics = BatchNormStatistics(model)
    x = (torch.randn(16, 8, 4, 4) * 1.1 + 0.1).to(torch.bfloat16)
    model(x)
    x = x.float()
    mean, var = x.mean(dim=(0, 2, 3)), x.var(dim=(0, 2, 3), unbiased=False)
    running_mean, running_var = model[0].running_mean.float(), model[0].running_var.float()
    expected = (mean - running_mean).pow(2).mean() + (var - running_var).pow(2).mean()
    got = statistics.loss()
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=0)


def test_upcast_keeps_structure_and_leaves_other_values_alone():
    Pair = namedtuple("Pair", "x y")
    ids = torch.arange(3)
    value = {"a": [torch.ones(2, dtype=torch.bfloat16), (ids, "s")], "b": Pair(torch.ones(1), 2)}
    out = upcast(value)
    assert out["a"][0].dtype == torch.float32 and out["a"][1][0] is ids and out["a"][1][1] == "s"
    assert isinstance(out["b"], Pair) and out["b"].x is value["b"].x and out["b"].y == 2


def test_outside_autocast_the_decorator_passes_inputs_through_unchanged():
    seen = []
    wrapped = computed_in_float32(lambda x: seen.append(x) or x)
    x = torch.ones(2, dtype=torch.bfloat16)
    assert wrapped(x) is x and seen[0] is x
    assert computed_in_float32(wrapped) is wrapped  # never wrapped twice
