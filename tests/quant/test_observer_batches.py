"""Observers over several calibration batches: minmax takes the extremes of all batches,
percentile and mse the mean of the per-batch ranges; one batch, native, and already-calibrated
layers behave as before."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from sqakd.quant import QuantPolicy, calibrate, prepare, quantized_layers
from sqakd.quant.observers import build_observer, combine_ranges

BATCHES = 3


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 3), nn.ReLU(), nn.Flatten(),
        nn.Linear(8 * 4 * 4, 4),
    )  # fmt: skip


def _batches(count: int = BATCHES, scale_step: float = 0.5) -> list[torch.Tensor]:
    """Batches of growing spread, so that each batch gives a different range."""
    generator = torch.Generator().manual_seed(1)
    return [
        torch.randn(16, 3, 8, 8, generator=generator) * (1 + scale_step * i) for i in range(count)
    ]


def _student(method: str, observer: str) -> nn.Module:
    policy = QuantPolicy(method=method, first_last="same", observer=observer)
    return prepare(_model(), policy, inplace=True)


def _activation_range(quantizer) -> tuple[torch.Tensor, torch.Tensor]:
    """The lowest and highest level of an activation quantizer's grid, in its input's units."""
    grid = quantizer.grid()
    scale, zero = grid.input_scale, grid.input_zero_point
    return (grid.qmin - zero) * scale, (grid.qmax - zero) * scale


def _calibrate_recording(student: nn.Module, batches, max_batches):
    """Calibrate; returns each layer's inputs, one per batch."""
    seen: dict[str, list[torch.Tensor]] = {}
    handles = [
        layer.register_forward_pre_hook(
            lambda _, args, name=name: seen.setdefault(name, []).append(args[0].clone())
        )
        for name, layer in quantized_layers(student)
    ]
    assert calibrate(student, batches, max_batches=max_batches) == max_batches
    for handle in handles:
        handle.remove()
    return seen


@pytest.mark.parametrize("method", ["lsq", "ewgs"])
@pytest.mark.parametrize("observer", ["minmax", "percentile", "mse"])
def test_each_activation_range_combines_every_batch(method, observer):
    student = _student(method, observer)
    seen = _calibrate_recording(student, _batches(), BATCHES)
    reference = build_observer(observer)
    for name, layer in quantized_layers(student):
        quantizer = layer.act_quantizer
        assert len(seen[name]) == BATCHES
        low, high = _activation_range(quantizer)  # first: the mse reference sets ranges
        per_batch = [reference(quantizer, x) for x in seen[name]]
        if observer == "minmax":  # the extremes of everything seen, as one tensor
            expected_low, expected_high = reference(quantizer, torch.cat(seen[name]))
        else:
            expected_low = torch.stack([r[0] for r in per_batch]).mean(0)
            expected_high = torch.stack([r[1] for r in per_batch]).mean(0)
        torch.testing.assert_close(high, expected_high)
        if quantizer.range_kind == "asymmetric":
            torch.testing.assert_close(low, expected_low)
        first_high = per_batch[0][1]
        assert not torch.allclose(high, first_high)  # not the first batch's range alone


@pytest.mark.parametrize("observer", ["minmax", "percentile", "mse"])
def test_one_batch_repeated_gives_the_one_batch_ranges(observer):
    """The mse search sets candidate ranges on the quantizer; they are put back, so later
    layers of later batches see what they saw in the first."""
    once = _student("ewgs", observer)
    calibrate(once, _batches(1))
    thrice = _student("ewgs", observer)
    calibrate(thrice, _batches(1) * BATCHES, max_batches=BATCHES)
    for (_, a), (_, b) in zip(quantized_layers(once), quantized_layers(thrice)):
        for x, y in zip(a.act_quantizer.state_dict().values(), b.act_quantizer.state_dict().values()):  # fmt: skip
            torch.testing.assert_close(x, y, rtol=1e-6, atol=0)


def test_native_and_one_batch_keep_the_first_batch_rule():
    for observer, max_batches in (("native", BATCHES), ("mse", 1)):
        first = _student("ewgs", observer)
        calibrate(first, _batches()[:1])
        more = _student("ewgs", observer)
        calibrate(more, _batches(), max_batches=max_batches)
        for x, y in zip(first.state_dict().values(), more.state_dict().values()):
            assert torch.equal(x, y)


def test_a_calibrated_model_keeps_its_ranges():
    student = _student("lsq", "minmax")
    calibrate(student, _batches(1))
    before = {k: v.clone() for k, v in student.state_dict().items()}
    calibrate(student, _batches(), max_batches=BATCHES)
    assert all(torch.equal(before[k], v) for k, v in student.state_dict().items())


def test_combine_ranges_by_observer_kind():
    ranges = [(torch.tensor(-1.0), torch.tensor(2.0)), (torch.tensor(-3.0), torch.tensor(1.0))]
    assert [float(v) for v in combine_ranges(build_observer("minmax"), ranges)] == [-3.0, 2.0]
    assert [float(v) for v in combine_ranges(build_observer("mse"), ranges)] == [-2.0, 1.5]
    with pytest.raises(ValueError, match="no range to combine"):
        combine_ranges(build_observer("mse"), [])
