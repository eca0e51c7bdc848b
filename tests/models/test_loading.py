"""Checkpoint loading: the layouts found in the wild load and give identical outputs; mismatches
are named; pickles that would run code are refused without running it."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from sqakd.models import build_model, load_weights, normalise_state_dict, read_state_dict


@pytest.fixture(scope="module")
def trained() -> nn.Module:
    """A resnet20 whose weights and BN statistics differ from a fresh one's."""
    torch.manual_seed(1)
    model = build_model("resnet20", num_classes=10)
    with torch.no_grad():
        for tensor in model.state_dict().values():
            if tensor.is_floating_point():
                tensor.add_(0.05 * torch.randn_like(tensor))
    return model.eval()


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(2))


def fresh() -> nn.Module:
    torch.manual_seed(99)
    return build_model("resnet20", num_classes=10).eval()


def layouts(model: nn.Module) -> dict[str, object]:
    """The same weights as saved by common training scripts and wrappers (DataParallel and DDP
    prefix ``module.``; ``torch.compile``'s wrapper prefixes ``_orig_mod.``)."""
    state = model.state_dict()
    return {
        "bare": state,
        "state_dict": {"state_dict": state, "epoch": 3, "best_prec1": 91.2},
        "model": {"model": state, "optimizer": {"lr": 0.1}},
        "model_state_dict": {"model_state_dict": state, "epoch": 7},
        "net": {"net": state, "acc": 0.9},
        "DataParallel": {f"module.{k}": v for k, v in state.items()},
        "torch.compile": {f"_orig_mod.{k}": v for k, v in state.items()},
        "wrapped DDP": {"state_dict": {f"module.{k}": v for k, v in state.items()}},
        "compiled DDP": {f"_orig_mod.module.{k}": v for k, v in state.items()},
    }


@pytest.mark.parametrize(
    "layout",
    [
        "bare",
        "state_dict",
        "model",
        "model_state_dict",
        "net",
        "DataParallel",
        "torch.compile",
        "wrapped DDP",
        "compiled DDP",
    ],
)
def test_every_layout_loads_from_a_file_and_gives_identical_outputs(
    layout: str, trained: nn.Module, images: torch.Tensor, tmp_path: Path
):
    path = tmp_path / "teacher.pt"
    torch.save(layouts(trained)[layout], path)
    model = fresh()
    with torch.no_grad():
        assert not torch.equal(model(images), trained(images))
        assert load_weights(model, path) is model
        assert torch.equal(model(images), trained(images))


def test_safetensors_loads_and_gives_identical_outputs(
    trained: nn.Module, images: torch.Tensor, tmp_path: Path
):
    path = tmp_path / "teacher.safetensors"
    save_file({f"module.{k}": v.contiguous() for k, v in trained.state_dict().items()}, str(path))
    state = read_state_dict(path)
    assert set(state) == set(trained.state_dict())
    model = fresh()
    load_weights(model, path)
    with torch.no_grad():
        assert torch.equal(model(images), trained(images))


def test_a_state_dict_in_memory_is_normalised_too(trained: nn.Module, images: torch.Tensor):
    model = fresh()
    load_weights(model, {f"module.{k}": v for k, v in trained.state_dict().items()})
    with torch.no_grad():
        assert torch.equal(model(images), trained(images))


def test_prefix_is_stripped_only_when_every_key_has_it():
    state = {"module.weight": torch.zeros(1), "bias": torch.zeros(1)}
    assert set(normalise_state_dict(state)) == {"module.weight", "bias"}


def test_mismatch_names_missing_and_unexpected_keys_with_counts(trained: nn.Module, tmp_path: Path):
    state = dict(trained.state_dict())
    state["linear.weight"] = state.pop("fc.weight")
    state["linear.bias"] = state.pop("fc.bias")
    state["bn2.weight"] = torch.ones(64)
    path = tmp_path / "ewgs_style.pt"
    torch.save(state, path)
    with pytest.raises(ValueError) as error:
        load_weights(fresh(), path)
    message = str(error.value)
    assert "\n" not in message and str(path) in message
    assert "2 missing key(s): fc.weight, fc.bias" in message
    assert "3 unexpected key(s): linear.weight, linear.bias, bn2.weight" in message


def test_long_key_lists_are_cut_with_a_count(trained: nn.Module):
    resnet32 = build_model("resnet32")
    with pytest.raises(ValueError, match=r"missing key\(s\): .*\.\.\. \(\d+ more\)") as error:
        load_weights(resnet32, trained.state_dict())
    missing = len(set(resnet32.state_dict()) - set(trained.state_dict()))
    assert f"{missing} missing key(s)" in str(error.value)


def test_shape_mismatch_is_reported_even_when_not_strict(trained: nn.Module):
    hundred_classes = build_model("resnet20", num_classes=100)
    for strict in (True, False):
        with pytest.raises(ValueError) as error:
            load_weights(hundred_classes, trained.state_dict(), strict=strict)
        assert "2 shape mismatch(es): fc.weight (checkpoint 10x64, model 100x64), fc.bias" in str(
            error.value
        )


def test_not_strict_loads_the_matching_keys(trained: nn.Module):
    state = {k: v for k, v in trained.state_dict().items() if not k.startswith("fc.")}
    state["extra.weight"] = torch.zeros(3)
    model = fresh()
    fc_before = model.fc.weight.clone()
    load_weights(model, state, strict=False)
    assert torch.equal(model.conv1.weight, trained.conv1.weight)
    assert torch.equal(model.fc.weight, fc_before)


class _Payload:
    """A pickle that runs a shell command when it is unpickled."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_pickle_that_would_run_code_is_refused_and_never_run(tmp_path: Path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    torch.save({"state_dict": {"conv1.weight": torch.zeros(1)}, "payload": _Payload(marker)}, path)
    with pytest.raises(ValueError) as error:
        read_state_dict(path)
    message = str(error.value)
    assert "\n" not in message
    assert "not a plain weights file" in message
    assert "state_dict" in message and "safetensors" in message
    assert not marker.exists()
    with pytest.raises(ValueError, match="not a plain weights file"):
        load_weights(fresh(), path)
    assert not marker.exists()


def test_a_whole_pickled_module_is_refused(tmp_path: Path):
    path = tmp_path / "whole_model.pt"
    torch.save(build_model("small_cnn"), path)
    with pytest.raises(ValueError, match="not a plain weights file.*torch.save\\(model.state_dict"):
        read_state_dict(path)


def test_missing_file(tmp_path: Path):
    with pytest.raises(FileNotFoundError, match="checkpoint .*nothing.pt does not exist"):
        load_weights(fresh(), tmp_path / "nothing.pt")


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_corrupt_file(tmp_path: Path, suffix: str):
    path = tmp_path / f"broken{suffix}"
    path.write_bytes(b"\x00\x01 definitely not a checkpoint")
    with pytest.raises(ValueError, match="truncated|corrupt") as error:
        read_state_dict(path)
    assert "\n" not in str(error.value)


def test_truncated_checkpoint(trained: nn.Module, tmp_path: Path):
    path = tmp_path / "cut.pt"
    torch.save(trained.state_dict(), path)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(ValueError, match="truncated"):
        read_state_dict(path)


@pytest.mark.parametrize(
    "content, found",
    [
        ({"epoch": 3, "optimizer": {"lr": 0.1}}, "keys epoch, optimizer"),
        ([torch.zeros(1)], "a list"),
        ({}, "an empty dict"),
    ],
)
def test_a_file_without_a_state_dict(tmp_path: Path, content: object, found: str):
    path = tmp_path / "odd.pt"
    torch.save(content, path)
    with pytest.raises(ValueError, match="not a state dict of tensors") as error:
        read_state_dict(path)
    assert found in str(error.value)


def test_a_dict_that_contains_itself_does_not_loop(tmp_path: Path):
    looped: dict = {"epoch": 1}
    looped["model"] = looped
    path = tmp_path / "loop.pt"
    torch.save(looped, path)
    with pytest.raises(ValueError, match="not a state dict of tensors"):
        read_state_dict(path)
