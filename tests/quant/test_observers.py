"""Calibration observers (minmax, percentile, mse) against brute-force references, through
prepare + calibrate on a small model, and over several calibration batches (minmax takes the
extremes of all batches, percentile and mse the mean of the per-batch ranges; one batch, native,
and already-calibrated layers behave as before)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from sqakd.config import load_config
from sqakd.quant import QuantPolicy, build_quantizer, calibrate, prepare, quantized_layers
from sqakd.quant.observers import (
    MinMaxObserver,
    MSEObserver,
    PercentileObserver,
    available_observers,
    build_observer,
    combine_ranges,
)


def _with_outliers(seed: int = 0, size: int = 400) -> torch.Tensor:
    torch.manual_seed(seed)
    x = torch.randn(size)
    x[:3] = torch.tensor([14.0, -11.0, 9.0])
    return x


def _hand_percentile(values: torch.Tensor, percent: float) -> torch.Tensor:
    """The sorted-array definition: interpolate linearly between order statistics."""
    ordered = sorted(values.tolist())
    position = percent / 100 * (len(ordered) - 1)
    below = int(position)
    above = min(below + 1, len(ordered) - 1)
    return torch.tensor(ordered[below] + (ordered[above] - ordered[below]) * (position - below))


def _lsq_error(x: torch.Tensor, clip: torch.Tensor | float, bits: int = 4) -> torch.Tensor:
    """Brute-force signed LSQ grid written out: step c / (2**(b-1) - 1), codes -2**(b-1)..."""
    top = 2 ** (bits - 1) - 1
    step = torch.as_tensor(clip, dtype=torch.float64) / top
    x = x.double()
    codes = torch.clamp(torch.round(x / step), -top - 1, top)
    return (codes * step - x).square().mean()


def _affine_error(x: torch.Tensor, low: float, high: float, bits: int = 4) -> torch.Tensor:
    """Brute-force affine grid ``low + k (high - low) / n``, k = 0..n (EWGS's activations)."""
    n = 2**bits - 1
    step = (high - low) / n
    x = x.double()
    codes = torch.clamp(torch.round((x - low) / step), 0, n)
    return (low + codes * step - x).square().mean()


# ------------------------------------------------------------------------------------- percentile
@pytest.mark.parametrize("percent", [99.99, 99.0, 90.0, 100.0])
def test_percentile_of_abs_x_is_torch_quantile_and_the_sorted_array_value(percent):
    x = _with_outliers()
    quantizer = build_quantizer("lsq", 4, "weight")
    low, high = PercentileObserver(percent)(quantizer, x)
    expected = torch.quantile(x.abs().double(), percent / 100).float()  # q in float64, as ours
    torch.testing.assert_close(high, expected)
    torch.testing.assert_close(high, _hand_percentile(x.abs(), percent))
    torch.testing.assert_close(low, -high)


def test_percentile_per_side_for_a_two_sided_range_and_per_channel():
    x = _with_outliers().reshape(4, 100) + 0.5
    quantizer = build_quantizer("lsq+", 4, "activation")
    low, high = PercentileObserver(99.0)(quantizer, x)
    torch.testing.assert_close(high, _hand_percentile(x.reshape(-1), 99.0))
    torch.testing.assert_close(low, _hand_percentile(x.reshape(-1), 1.0).clamp(max=0.0))
    weights = build_quantizer("lsq", 4, "weight", per_channel=True)
    _, per_channel = PercentileObserver(95.0)(weights, x)
    torch.testing.assert_close(per_channel, torch.quantile(x.abs().double(), 0.95, dim=1).float())
    unsigned = build_quantizer("lsq", 4, "activation")
    low, high = PercentileObserver(95.0)(unsigned, x)
    assert float(low) == 0.0
    torch.testing.assert_close(high, torch.quantile(x.reshape(-1).double(), 0.95).float())


def test_calibrate_sets_the_percentile_clip_as_the_top_level():
    x = _with_outliers()
    quantizer = build_quantizer("lsq", 4, "weight")
    quantizer.observer = build_observer("percentile", 99.0)
    quantizer.calibrate(x)
    torch.testing.assert_close(quantizer.step_size * 7, _hand_percentile(x.abs(), 99.0))


# ------------------------------------------------------------------------------------------- mse
def test_the_mse_clip_is_the_minimiser_of_an_exhaustive_fine_search():
    x = _with_outliers()
    quantizer = build_quantizer("lsq", 4, "weight")
    _, clip = MSEObserver()(quantizer, x)
    peak = float(x.abs().max())
    candidates = torch.linspace(peak / 20000, peak, 20000, dtype=torch.float64)
    errors = torch.stack([_lsq_error(x, c) for c in candidates])
    best = int(errors.argmin())
    assert float(_lsq_error(x, clip)) <= float(errors[best]) * (1 + 1e-3)
    assert abs(float(clip) - float(candidates[best])) <= peak / 1000  # the same basin
    assert float(_lsq_error(x, clip)) < float(_lsq_error(x, peak))  # min/max's clip


def test_the_mse_range_of_a_two_sided_grid_beats_min_max_and_a_fine_search():
    x = _with_outliers(1).abs() - 0.3  # mostly positive, some negatives, outliers above
    quantizer = build_quantizer("ewgs", 4, "activation")
    low, high = MSEObserver()(quantizer, x)
    low0, high0 = MinMaxObserver()(quantizer, x)
    assert float(low0) == float(x.min()) and float(high0) == float(x.max())
    fractions = torch.linspace(1 / 20000, 1.0, 20000)
    errors = torch.stack([_affine_error(x, float(f * low0), float(f * high0)) for f in fractions])
    ours = _affine_error(x, float(low), float(high))
    assert float(ours) <= float(errors.min()) * (1 + 1e-3)
    assert float(ours) < float(_affine_error(x, float(low0), float(high0)))


def test_mse_per_channel_picks_each_channels_own_clip():
    x = torch.stack([_with_outliers(2), torch.randn(400) * 0.1])
    quantizer = build_quantizer("lsq", 4, "weight", per_channel=True)
    _, clip = MSEObserver()(quantizer, x)
    for row, value in zip(x, clip):
        _, alone = MSEObserver()(build_quantizer("lsq", 4, "weight"), row)
        torch.testing.assert_close(value, alone)


# ---------------------------------------------------------------------------- prepare + calibrate
def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 3), nn.ReLU(), nn.Flatten(),
        nn.Linear(8 * 4 * 4, 4),
    )  # fmt: skip


def _calibrated(method: str, observer: str, inputs: dict[str, torch.Tensor]) -> nn.Module:
    """A prepared, calibrated student; ``inputs`` gets each quantized layer's calibration input."""
    student = prepare(
        _model(), QuantPolicy(method=method, first_last="same", observer=observer), inplace=True
    )
    for name, layer in quantized_layers(student):
        layer.register_forward_pre_hook(lambda _, args, name=name: inputs.setdefault(name, args[0]))
    torch.manual_seed(1)
    calibrate(student, [torch.randn(16, 3, 8, 8)])
    return student


@pytest.mark.parametrize("method", ["lsq", "ewgs"])
def test_each_observer_gives_its_own_on_grid_ranges(method):
    """After calibrate, every range is the observer's range of the tensor the quantizer saw
    (its top and bottom levels), the quantizer's output lies on its grid, and the four
    observers give four different sets of ranges."""
    ranges = {}
    for observer in ("native", "minmax", "percentile", "mse"):
        inputs: dict[str, torch.Tensor] = {}
        student = _calibrated(method, observer, inputs)
        found = []
        for name, layer in quantized_layers(student):
            for quantizer, x in ((layer.weight_quantizer, layer.weight), (layer.act_quantizer, inputs[name])):  # fmt: skip
                assert (quantizer.observer is None) == (observer == "native")
                grid = quantizer.grid()
                scale, zero = grid.input_scale, grid.input_zero_point
                top = (grid.qmax - zero) * scale  # the highest level, in x's units
                found.append(float(top))
                with torch.no_grad():  # the fake-quantized values are grid levels
                    torch.testing.assert_close(
                        quantizer(x), grid.dequantize(quantizer.codes(x)), rtol=0, atol=1e-6
                    )
                if observer == "native":
                    continue
                low, high = build_observer(observer)(quantizer, x)
                if method == "lsq" and quantizer.role == "weight":  # codes -8..7, clip at 7
                    torch.testing.assert_close(scale * 7, high)
                else:
                    torch.testing.assert_close(top, high)
                    torch.testing.assert_close(-zero * scale, low)  # the lowest level
        ranges[observer] = found
    values = list(ranges.values())
    assert all(a != b for i, a in enumerate(values) for b in values[i + 1 :])


def test_native_is_each_quantizers_own_initialisation():
    assert available_observers() == ["native", "minmax", "mse", "percentile"]
    assert build_observer("native") is None
    plain = prepare(_model(), QuantPolicy(method="lsq", first_last="same"))
    named = prepare(_model(), QuantPolicy(method="lsq", first_last="same", observer="native"))
    torch.manual_seed(1)
    images = torch.randn(16, 3, 8, 8)
    calibrate(plain, [images]), calibrate(named, [images])
    for (_, a), (_, b) in zip(quantized_layers(plain), quantized_layers(named)):
        assert a.weight_quantizer.observer is None
        torch.testing.assert_close(a.weight_quantizer.step_size, b.weight_quantizer.step_size)
        x = a.weight.detach()
        torch.testing.assert_close(
            a.weight_quantizer.step_size, 2 * x.abs().mean() / 7**0.5
        )  # LSQ's rule


def test_quantizers_without_a_range_keep_their_rule_with_one_warning_or_are_refused():
    policy = QuantPolicy(method="lsq", weight_method="binary", weight_bits=1, first_last="same",
                         observer="mse")  # fmt: skip
    with pytest.warns(UserWarning, match=r"observer=mse does not apply to binary weights") as seen:
        student = prepare(_model(), policy)
    assert sum("observer" in str(w.message) for w in seen) == 1
    layer = quantized_layers(student)[0][1]
    assert layer.weight_quantizer.observer is None and layer.act_quantizer.observer is not None
    with pytest.raises(ValueError, match=r"^quant.observer=percentile would set no range: dorefa"):
        prepare(_model(), QuantPolicy(method="dorefa", observer="percentile"))
    apot = QuantPolicy(method="apot", observer="minmax")
    with pytest.raises(ValueError, match="apot activations, apot weights take none"):
        prepare(_model(), apot)


def test_the_policy_validates_the_observer_at_the_edge():
    config = load_config(None, ["quant.observer=percentile", "quant.observer_percentile=99.9"])
    assert (config.quant.observer, config.quant.observer_percentile) == ("percentile", 99.9)
    with pytest.raises(ValueError, match="unknown observer 'l2'; choose one of: native, minmax"):
        load_config(None, ["quant.observer=l2"])
    with pytest.raises(ValueError, match="observer_percentile"):
        load_config(None, ["quant.observer_percentile=40"])
    with pytest.raises(ValueError, match="above 50 and at most 100"):
        PercentileObserver(101.0)


# ------------------------------------------------------------------ several calibration batches
BATCHES = 3


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
        # EWGS: one more forward of the first batch matches the output scales to the new ranges
        assert len(seen[name]) == BATCHES + (method == "ewgs")
        seen[name] = seen[name][:BATCHES]
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


def test_ewgs_output_scales_are_matched_to_the_combined_ranges():
    """EWGS's weight output scale is set from the float and quantized outputs; after the ranges
    are combined it is set again on the first batch, so it is the scale that matching with the
    final ranges gives (a fixed point), not the first batch's range's scale."""
    first_only = _student("ewgs", "minmax")
    calibrate(first_only, _batches()[:1])
    student = _student("ewgs", "minmax")
    seen = _calibrate_recording(student, _batches(), BATCHES)
    student.eval()  # as calibrate runs it
    for name, layer in quantized_layers(student):
        scale = layer.weight_quantizer.output_scale.detach().clone()
        layer.calibrate_weight(seen[name][-1])  # the re-run's input, with the final ranges
        torch.testing.assert_close(layer.weight_quantizer.output_scale, scale, rtol=1e-6, atol=0)
    scales = [layer.weight_quantizer.output_scale for _, layer in quantized_layers(student)]
    before = [layer.weight_quantizer.output_scale for _, layer in quantized_layers(first_only)]
    assert any(not torch.allclose(a, b) for a, b in zip(scales, before))
