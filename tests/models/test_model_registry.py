"""build_model: registered names, user builders given as module:function or file.py:function,
and the one-line errors for bad names, specs and options."""

from __future__ import annotations

import sys
import textwrap
from pathlib import Path

import pytest
import torch
from torch import nn

from sqakd.models import available_models, build_model, register_model
from sqakd.models import registry as registry_module

USER_MODULE = """
from torch import nn

def build(num_classes=10, in_channels=3, hidden=8):
    return nn.Sequential(nn.Flatten(), nn.Linear(in_channels * 4, hidden), nn.ReLU(),
                         nn.Linear(hidden, num_classes))

def not_a_module(num_classes=10, in_channels=3):
    return "a string"

def only_classes(num_classes):
    return nn.Linear(4, num_classes)

VALUE = 3
"""


@pytest.fixture
def user_package(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A package ``sqakd_test_nets`` with module ``nets`` on sys.path for this test only."""
    package = tmp_path / "sqakd_test_nets"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "nets.py").write_text(textwrap.dedent(USER_MODULE))
    monkeypatch.syspath_prepend(str(tmp_path))
    yield package
    for name in [n for n in sys.modules if n.startswith("sqakd_test_nets")]:
        del sys.modules[name]


def test_registered_names_include_every_family():
    names = available_models()
    assert names == sorted(names)
    for name in ("resnet20", "resnet56", "vgg8", "vgg13", "mobilenetv2", "small_cnn", "resnet18"):
        assert name in names


def test_num_classes_and_options_reach_the_builder():
    model = build_model("mobilenetv2", num_classes=13, width_mult=0.5)
    assert model.classifier[-1].out_features == 13
    assert model.features[0][0].out_channels == 16


def test_unknown_name_lists_the_known_ones():
    with pytest.raises(ValueError, match="unknown model 'resnet21'") as error:
        build_model("resnet21")
    assert "resnet20" in str(error.value) and "package.module:function" in str(error.value)


def test_unknown_option_names_the_accepted_ones():
    with pytest.raises(ValueError, match="accepts: num_classes, in_channels") as error:
        build_model("resnet20", width=2)
    assert "width" in str(error.value)


@pytest.mark.parametrize("value", [0, -3, 2.5, True])
def test_bad_class_count(value):
    with pytest.raises(ValueError, match="num_classes must be a positive whole number"):
        build_model("resnet20", num_classes=value)


def test_registering_a_name_twice_is_refused(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(registry_module, "_MODELS", dict(registry_module._MODELS))

    @register_model("tiny_test_net")
    def tiny(num_classes: int = 10, in_channels: int = 3) -> nn.Module:
        return nn.Linear(in_channels, num_classes)

    assert build_model("tiny_test_net", num_classes=4, in_channels=2).weight.shape == (4, 2)
    with pytest.raises(ValueError, match="registered twice"):
        register_model("tiny_test_net")(tiny)
    with pytest.raises(ValueError, match="':'"):
        register_model("a:b")(tiny)


def test_user_module_function(user_package: Path):
    model = build_model("sqakd_test_nets.nets:build", num_classes=5, in_channels=2, hidden=6)
    assert model[1].in_features == 8 and model[1].out_features == 6 and model[3].out_features == 5
    assert model(torch.randn(3, 2, 2, 2)).shape == (3, 5)


def test_user_file_function(tmp_path: Path):
    path = tmp_path / "my_net.py"
    path.write_text(textwrap.dedent(USER_MODULE))
    model = build_model(f"{path}:build", num_classes=4, in_channels=1)
    assert model(torch.randn(2, 1, 2, 2)).shape == (2, 4)
    # the same file is imported once
    again = build_model(f"{path}:build", num_classes=4, in_channels=1)
    assert type(again[1]) is type(model[1])


def test_user_builder_without_in_channels_works_when_none_is_given(user_package: Path):
    assert build_model("sqakd_test_nets.nets:only_classes", num_classes=3).out_features == 3
    with pytest.raises(ValueError, match="accepts: num_classes"):
        build_model("sqakd_test_nets.nets:only_classes", num_classes=3, in_channels=3)


@pytest.mark.parametrize(
    "spec, message",
    [
        ("sqakd_no_such_package.nets:build", "cannot be imported"),
        ("sqakd_test_nets.nets:missing", "has no attribute 'missing'"),
        ("sqakd_test_nets.nets:VALUE", "not a function"),
        ("sqakd_test_nets.nets:not_a_module", "returned str, not a torch.nn.Module"),
        ("sqakd_test_nets.nets:", "not of the form"),
        (":build", "not of the form"),
        ("sqakd_test_nets.nets:bad-name", "not of the form"),
        ("/no/such/dir/net.py:build", "does not exist"),
    ],
)
def test_bad_user_specs(user_package: Path, spec: str, message: str):
    with pytest.raises(ValueError, match=message) as error:
        build_model(spec)
    assert "\n" not in str(error.value)
