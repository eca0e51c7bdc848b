"""Teacher checkpoints from other implementations of the same architecture load."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from sqakd.models import build_model, load_weights


def _resnet20_state() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    return build_model("resnet20", num_classes=10).state_dict()


def _same_weights(model: nn.Module, state: dict[str, torch.Tensor]) -> bool:
    own = model.state_dict()
    return all(torch.equal(own[k], v) for k, v in state.items() if k in own)


def test_a_checkpoint_without_num_batches_tracked_loads(tmp_path):
    state = {k: v for k, v in _resnet20_state().items() if "num_batches_tracked" not in k}
    torch.save(state, tmp_path / "old.pt")
    model = load_weights(build_model("resnet20", num_classes=10), tmp_path / "old.pt")
    assert _same_weights(model, state)
    assert int(model.bn1.num_batches_tracked) == 0


def test_a_linear_classifier_loads_into_the_registry_resnet(tmp_path):
    state = {k.replace("fc.", "linear."): v for k, v in _resnet20_state().items()}
    torch.save({"net": state}, tmp_path / "public.pt")
    model = load_weights(build_model("resnet20", num_classes=10), tmp_path / "public.pt")
    torch.testing.assert_close(model.fc.weight, state["linear.weight"])


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.classifier = nn.Linear(4, 2)


def test_a_shape_compatible_mismatch_proposes_the_key_map():
    state = {
        "features.0.weight": torch.randn(4, 3, 3, 3),
        "features.0.bias": torch.randn(4),
        "head.weight": torch.randn(2, 4),
        "head.bias": torch.randn(2),
    }
    with pytest.raises(ValueError) as error:
        load_weights(Net(), state)
    assert "load with key_map {'features.0.': 'conv.', 'head.': 'classifier.'}" in str(error.value)
    model = load_weights(Net(), state, key_map={"features.0.": "conv.", "head.": "classifier."})
    torch.testing.assert_close(model.classifier.weight, state["head.weight"])
    pairings: list[str] = []
    model = load_weights(Net(), state, match="shapes", log=pairings.append)
    torch.testing.assert_close(model.conv.bias, state["features.0.bias"])
    assert (
        pairings[0] == "the state dict: features.0.weight -> conv.weight (matched by shape 4x3x3x3)"
    )


def test_a_key_map_that_matches_no_key_names_it():
    state = Net().state_dict()
    with pytest.raises(
        ValueError,
        match=r"key map entry 'linear\.' matches no key of the state dict; its keys begin with classifier\., conv\.",
    ):
        load_weights(Net(), state, key_map={"linear.": "classifier."})
