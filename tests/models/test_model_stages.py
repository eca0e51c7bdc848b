"""Stage names in the model registry: every registered model declares them, they tap cleanly
(4-d maps, no in-place change after the tap), and ``resolve_tap_names`` turns a spec into names."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from sqakd.distill import FeatureTaps
from sqakd.models import (
    available_models,
    build_model,
    model_stages,
    register_model,
    resolve_tap_names,
)
from sqakd.models import registry as registry_module

#: small widths where the constructor takes one; (in_channels, side) small but valid
OPTIONS = {"small_cnn": {"width": 4}, "mobilenetv2": {"width_mult": 0.25}}
INPUT = {"small_cnn": (1, 28)}

EXPECTED = {
    "resnet20": ("layer1", "layer2", "layer3"),
    "resnet18": ("layer1", "layer2", "layer3", "layer4"),
    "vgg8": ("layer0", "layer1", "layer2", "layer3", "layer4"),
    "mobilenetv2": ("features.1", "features.3", "features.6", "features.13", "features.17"),
    "shufflenetv2": ("stage2", "stage3", "stage4"),
    "squeezenet": ("features.4", "features.7", "features.12"),
    "small_cnn": ("relu1", "relu2", "relu3"),
}


@pytest.mark.parametrize("name", available_models())
def test_every_registered_model_taps_its_stages(name: str):
    stages = model_stages(name)
    assert stages and resolve_tap_names("stages", name) == list(stages)
    channels, side = INPUT.get(name, (3, 16))
    torch.manual_seed(0)
    model = build_model(name, num_classes=3, in_channels=channels, **OPTIONS.get(name, {}))
    with FeatureTaps(model, stages) as taps:  # train mode, with autograd: as in distillation
        logits, features = taps(torch.randn(2, channels, side, side))
    assert logits.shape == (2, 3)
    assert list(features) == list(stages)
    sides = [f.shape[-1] for f in features.values()]
    assert all(f.dim() == 4 and f.shape[0] == 2 for f in features.values())
    assert sides == sorted(sides, reverse=True)  # shallow to deep: the maps never grow


@pytest.mark.parametrize(("name", "stages"), sorted(EXPECTED.items()))
def test_stage_names_per_family(name: str, stages: tuple[str, ...]):
    assert model_stages(name) == stages


def test_resnet_and_vgg_stages_do_not_depend_on_depth():
    assert {model_stages(f"resnet{d}") for d in (20, 32, 44, 56, 110)} == {EXPECTED["resnet20"]}
    assert model_stages("resnet34") == EXPECTED["resnet18"]
    assert model_stages("vgg11") == model_stages("vgg13") == EXPECTED["vgg8"]


def test_a_list_of_names_is_taken_as_it_is():
    assert resolve_tap_names(["layer2", "layer3"], "resnet20") == ["layer2", "layer3"]
    assert resolve_tap_names(("block1",), "nets.py:build") == ["block1"]


@pytest.mark.parametrize("model_name", ["my_nets.py:build", "my_pkg.nets:build"])
def test_stages_of_a_user_model_ask_for_module_names(model_name: str):
    with pytest.raises(ValueError) as error:
        resolve_tap_names("stages", model_name)
    message = str(error.value)
    assert "\n" not in message
    assert model_name in message and "method.layers: [block1, block2]" in message


@pytest.mark.parametrize(
    ("spec", "match"),
    [("layer2", r"write \[layer2\]"), ([], "non-empty list"), (["layer2", 3], "module names")],
)
def test_bad_specs(spec, match: str):
    with pytest.raises(ValueError, match=match):
        resolve_tap_names(spec, "resnet20")


def test_unknown_model_lists_the_known_ones():
    with pytest.raises(ValueError, match="unknown model 'resnet21'.*resnet20"):
        model_stages("resnet21")


def test_registering_stages(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(registry_module, "_MODELS", dict(registry_module._MODELS))

    def tiny(num_classes: int = 10, in_channels: int = 3) -> nn.Module:
        return nn.Sequential(nn.Conv2d(in_channels, 4, 3), nn.Flatten(), nn.LazyLinear(num_classes))

    register_model("tiny_staged", stages=["0"])(tiny)
    assert model_stages("tiny_staged") == ("0",)
    register_model("tiny_unstaged")(tiny)
    with pytest.raises(ValueError, match=r"declares no stage names.*stages=\(\.\.\.\)"):
        model_stages("tiny_unstaged")
    with pytest.raises(ValueError, match="sequence of module names"):
        register_model("tiny_bad", stages="0")
