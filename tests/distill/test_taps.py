"""FeatureTaps: forward hooks on named submodules of unmodified models, per call, through DDP and
after quant.prepare, with the in-place pitfall detected and the hooks removable."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from torch import Tensor, nn

from sqakd.distill import FeatureTaps
from sqakd.models import build_model, model_stages
from sqakd.quant import QuantPolicy, prepare

STAGES = ("layer1", "layer2", "layer3")


@pytest.fixture
def resnet20() -> nn.Module:
    torch.manual_seed(0)
    return build_model("resnet20").eval()


def hook_count(model: nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


class InPlaceAfterTap(nn.Module):
    """``bn``'s output is changed in place by the ReLU that follows it."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: Tensor) -> Tensor:
        return self.relu(self.bn(self.conv(x))).mean(dim=(2, 3))


def test_stage_shapes_and_unchanged_logits(resnet20: nn.Module):
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        plain = resnet20(images)
        with FeatureTaps(resnet20, STAGES) as taps:
            logits, features = taps(images)
    assert torch.equal(logits, plain)
    assert list(features) == list(STAGES)
    shapes = [tuple(f.shape) for f in features.values()]
    assert shapes == [(2, 16, 32, 32), (2, 32, 16, 16), (2, 64, 8, 8)]
    assert model_stages("resnet20") == STAGES


def test_features_are_in_the_order_of_names(resnet20: nn.Module):
    with FeatureTaps(resnet20, ["layer3", "layer1"]) as taps:
        _, features = taps(torch.randn(1, 3, 32, 32))
    assert list(features) == ["layer3", "layer1"]


def test_features_of_one_call_do_not_leak_into_the_next(resnet20: nn.Module):
    with FeatureTaps(resnet20, STAGES) as taps, torch.no_grad():
        _, first = taps(torch.randn(2, 3, 32, 32))
        kept = {name: f.clone() for name, f in first.items()}
        _, second = taps(torch.randn(3, 3, 16, 16))
        assert second["layer1"].shape == (3, 16, 16, 16)
        for name in STAGES:  # the first call's dict still holds the first call's tensors
            assert torch.equal(first[name], kept[name])
        # the model called directly: taps.features is that call's
        resnet20(torch.randn(1, 3, 8, 8))
        assert taps.features["layer3"].shape == (1, 64, 2, 2)


def test_input_capture(resnet20: nn.Module):
    with FeatureTaps(resnet20, ["fc", "layer2"], capture="input") as taps, torch.no_grad():
        _, features = taps(torch.randn(2, 3, 32, 32))
        assert features["fc"].shape == (2, 64)
        assert features["layer2"].shape == (2, 16, 32, 32)


def test_unknown_name_lists_close_matches_and_real_names(resnet20: nn.Module):
    with pytest.raises(ValueError) as error:
        FeatureTaps(resnet20, ["layer1", "layr2"])
    message = str(error.value)
    assert "\n" not in message
    assert message.startswith("no layer 'layr2' in CifarResNet; did you mean 'layer2'")
    assert "layers are: conv1, bn1, relu, layer1, layer2, layer3, avgpool, fc" in message
    assert "(71 in all)" in message  # capped, not all 71 names


@pytest.mark.parametrize(
    ("names", "match"),
    [([], "no layers to tap"), (["layer1", "layer1"], "named twice"), ("layer1", "write")],
)
def test_bad_name_lists(resnet20: nn.Module, names, match: str):
    with pytest.raises(ValueError, match=match):
        FeatureTaps(resnet20, names)


def test_in_place_change_after_the_tap_is_detected_and_clone_fixes_it():
    torch.manual_seed(0)
    model = InPlaceAfterTap()
    images = torch.randn(2, 2, 6, 6)
    with FeatureTaps(model, ["bn"]) as taps:
        with pytest.raises(RuntimeError, match="'bn' was modified in place.*clone=True"):
            taps(images)
    with FeatureTaps(model, ["bn"], clone=True) as taps:
        _, features = taps(images)
    expected = model.bn(model.conv(images))  # train-mode BN: same batch, same output
    assert torch.allclose(features["bn"], expected)
    assert (features["bn"] < 0).any()  # the ReLU did not reach the clone


def test_stem_batchnorm_of_resnet20_is_caught(resnet20: nn.Module):
    with FeatureTaps(resnet20, ["bn1"]) as taps, pytest.raises(RuntimeError, match="in place"):
        taps(torch.randn(1, 3, 32, 32))


def test_taps_on_a_prepared_student_fire(resnet20: nn.Module):
    student = prepare(resnet20, QuantPolicy(method="lsq", weight_bits=4, act_bits=4))
    assert type(student.layer2[0].conv1) is not nn.Conv2d  # prepare swapped the layers
    images = torch.randn(2, 3, 32, 32)
    with FeatureTaps(student, [*STAGES, "layer2.0.conv1"]) as taps:
        logits, features = taps(images)
        logits.sum().backward()  # the features are part of the graph
    assert features["layer2"].shape == (2, 32, 16, 16)
    assert features["layer2.0.conv1"].shape == (2, 32, 16, 16)
    assert torch.allclose(logits, student(images))


def test_taps_ignore_a_deep_copy_and_miss_a_swapped_layer(resnet20: nn.Module):
    images = torch.randn(1, 3, 32, 32)
    taps = FeatureTaps(resnet20, ["layer2", "layer2.0.conv1"])
    with torch.no_grad():
        taps(images)
        teacher_layer2 = taps.features["layer2"]
        student = prepare(resnet20)  # a deep copy: it carries the hooks along
        student(torch.randn(4, 3, 32, 32))
        assert taps.features["layer2"] is teacher_layer2  # the copy's calls are ignored
        prepare(resnet20, inplace=True)
        with pytest.raises(RuntimeError, match="'layer2.0.conv1' did not run.*after prepare"):
            taps(images)
    taps.remove()


def test_taps_through_a_ddp_wrapper(resnet20: nn.Module, tmp_path: Path):
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/store", rank=0, world_size=1)
    try:
        wrapped = nn.parallel.DistributedDataParallel(resnet20)
        images = torch.randn(2, 3, 32, 32)
        with FeatureTaps(wrapped, STAGES) as taps:
            assert hook_count(resnet20) == len(STAGES) + 1
            logits, features = taps(images)
            assert features["layer3"].shape == (2, 64, 8, 8)
            assert torch.allclose(logits, resnet20(images))
            wrapped(images[:1])  # a method calling the wrapper itself reads taps.features
            assert taps.features["layer1"].shape == (1, 16, 32, 32)
    finally:
        dist.destroy_process_group()


def test_remove_takes_the_hooks_off(resnet20: nn.Module):
    before = hook_count(resnet20)
    taps = FeatureTaps(resnet20, STAGES)
    assert hook_count(resnet20) == before + len(STAGES) + 1  # one per name, one to start a call
    taps.remove()
    assert hook_count(resnet20) == before
    with pytest.raises(RuntimeError, match="removed"):
        _ = taps.features
    with FeatureTaps(resnet20, STAGES):
        assert hook_count(resnet20) == before + len(STAGES) + 1
    assert hook_count(resnet20) == before


def test_reading_before_a_forward_and_a_shared_module():
    model = build_model("small_cnn", width=4)
    with FeatureTaps(model, ["relu1", "pool"]) as taps:
        with pytest.raises(RuntimeError, match="no forward has run"):
            _ = taps.features
        with pytest.raises(RuntimeError, match="'pool' ran more than once"):
            taps(torch.randn(1, 1, 28, 28))
