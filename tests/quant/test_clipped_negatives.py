"""calibrate() names, in one warning line, the layers whose negative inputs an activation grid
with lowest level 0 turns into 0, and stays quiet where the grid keeps them or none are seen."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from sqakd.quant import QuantPolicy, calibrate, prepare
from sqakd.quant.calibrate import lowest_level


def _model() -> nn.Module:
    torch.manual_seed(0)  # fc1 sees signed inputs; fc2 sees a ReLU's output
    return nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))


def _warnings(policy: QuantPolicy, inputs: torch.Tensor) -> list[str]:
    student = prepare(_model(), policy)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        calibrate(student, [inputs], max_batches=1)
    return [str(w.message) for w in seen if "sqakd.calibrate" in str(w.message)]


SIGNED = torch.randn(64, 6)


@pytest.mark.parametrize("method", ["lsq", "dsq", "pact", "dorefa"])
def test_an_unsigned_grid_on_signed_inputs_is_named_with_the_fix(method):
    found = _warnings(QuantPolicy(method=method, first_last="same"), SIGNED)
    assert len(found) == 1 and "\n" not in found[0]
    message = found[0]
    assert message.startswith("sqakd.calibrate: 1 layer(s) get negative inputs")
    share = float((SIGNED < 0).float().mean())
    assert f"0 ({share:.0%} below 0, down to {float(SIGNED.min()):.3g})" in message
    assert "quant.act_options: {signed: true}" in message and "act_method: lsq+" in message


@pytest.mark.parametrize(
    "policy",
    [
        QuantPolicy(method="lsq", first_last="same", act_options={"signed": True}),
        QuantPolicy(method="lsq", first_last="same", act_method="lsq+"),
        QuantPolicy(method="ewgs", first_last="same"),  # lower = min(x) < 0
    ],
    ids=["signed-lsq", "lsq+", "ewgs"],
)
def test_a_grid_with_negative_levels_is_not_reported(policy):
    assert _warnings(policy, SIGNED) == []


def test_non_negative_inputs_and_a_float_first_layer_are_not_reported():
    assert _warnings(QuantPolicy(method="lsq", first_last="same"), SIGNED.abs()) == []
    assert _warnings(QuantPolicy(method="lsq", first_last="float"), SIGNED) == []
    # below the 1 % share: 0.5 % of the values negative
    few = SIGNED.abs().flatten()
    few[:2] = -1.0
    assert _warnings(QuantPolicy(method="lsq", first_last="same"), few.reshape(64, 6)) == []


def test_lowest_level_reads_the_grid_in_input_units():
    student = prepare(_model(), QuantPolicy(method="ewgs", first_last="same"))
    calibrate(student, [SIGNED])
    quantizer = student[0].act_quantizer
    # EWGS's forward gives levels in [0, 1]; its grid's lowest level is lower = min(x)
    assert float(quantizer(SIGNED).min()) == 0.0
    assert lowest_level(quantizer, SIGNED.min().reshape(1, 1)) == pytest.approx(
        float(SIGNED.min()), rel=1e-6
    )
