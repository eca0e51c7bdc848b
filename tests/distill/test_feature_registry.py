"""The feature-loss registry: each loss declares its released weight, what it reads and what it
needs; it is apart from the logit-loss registry; unknown names and options are one-line errors."""

from __future__ import annotations

import pytest

from sqakd.config import load_config
from sqakd.distill import (
    available_feature_losses,
    available_losses,
    build_feature_loss,
    feature_loss_class,
)

#: name -> (released weight, what it reads), SQAKD's run_cifar10_resnet20_EWGS+KDs.sh
RELEASED = {
    "at": (1000.0, "stages"),
    "nst": (50.0, "stages"),
    "sp": (3000.0, "last"),
    "rkd": (1.0, "embedding"),
    "cc": (0.02, "embedding"),
    "fitnet": (100.0, "middle"),
    "vid": (1.0, "stages"),
    "kd": (1.0, "logits"),
    "crd": (0.8, "embedding"),
    "fsp": (50.0, "chain"),
    "ft": (200.0, "last"),
}


def test_two_stage_losses_declare_their_pre_stage_and_crd_its_needs():
    fsp, ft, crd = (feature_loss_class(name) for name in ("fsp", "ft", "crd"))
    assert (fsp.pre_epochs, fsp.pre_trains, fsp.main_stage) == (30, "student", False)
    assert (ft.pre_epochs, ft.pre_trains, ft.main_stage, ft.pre_group) == (
        30,
        "own",
        True,
        "paraphraser",
    )
    assert crd.needs_index and crd.needs_labels(True) and not crd.needs_labels(False)
    assert not crd.needs_labels(True, sampler="instance") and crd.needs_labels(
        False, sampler="class"
    )


@pytest.mark.parametrize("name", sorted(RELEASED))
def test_each_loss_declares_its_released_weight_and_features(name):
    cls = feature_loss_class(name)
    assert (cls.weight, cls.reads) == RELEASED[name]
    assert cls.name == name


def test_the_zoo_is_apart_from_the_logit_losses():
    assert set(RELEASED) <= set(available_feature_losses())
    assert not {"at", "sp", "rkd", "fitnet"} & set(available_losses())
    with pytest.raises(ValueError, match="'at' is not a registered loss"):
        load_config(None, ["method.beta=1", "method.extra_loss=at"])


def test_unknown_names_and_options_are_one_line_errors():
    with pytest.raises(ValueError, match="unknown feature loss 'atx'; choose one of: at, cc") as e:
        feature_loss_class("atx")
    assert "\n" not in str(e.value)
    with pytest.raises(ValueError, match="'rkd' has no option 'angle'; its options are: "
                       "distance_weight, angle_weight"):  # fmt: skip
        build_feature_loss("rkd", {}, {}, angle=1.0)
