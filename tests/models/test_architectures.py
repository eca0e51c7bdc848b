"""Every registered architecture: builds, runs, and has the structure and size of its paper."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from sqakd.models import available_models, build_model
from sqakd.models.resnet_cifar import ChannelPadShortcut
from sqakd.models.shufflenetv2 import channel_shuffle

#: (channels, side) of the images each model is meant for
INPUT = {
    "resnet20": (3, 32),
    "resnet32": (3, 32),
    "resnet44": (3, 32),
    "resnet56": (3, 32),
    "resnet110": (3, 32),
    "vgg8": (3, 32),
    "vgg11": (3, 64),
    "vgg13": (3, 32),
    "mobilenetv2": (3, 32),
    "small_cnn": (1, 28),
    "resnet18": (3, 64),
    "resnet34": (3, 64),
    "shufflenetv2": (3, 64),
    "squeezenet": (3, 64),
}


def count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def weighted_layers(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]


def test_every_registered_model_has_an_input_size_here():
    assert set(available_models()) == set(INPUT)


#: deeper variants of a family already covered: their forward runs with the slow tests
DEEP = {"resnet44", "resnet56", "resnet110", "resnet34"}


@pytest.mark.parametrize(
    "name", [pytest.param(n, marks=pytest.mark.slow) if n in DEEP else n for n in sorted(INPUT)]
)
def test_forward_gives_one_logit_per_class(name: str):
    channels, side = INPUT[name]
    torch.manual_seed(0)
    model = build_model(name, num_classes=7, in_channels=channels).eval()
    with torch.no_grad():
        logits = model(torch.randn(2, channels, side, side))
    assert logits.shape == (2, 7)
    assert torch.isfinite(logits).all()
    # the two images give different logits (the network is not constant)
    spread = (logits[0] - logits[1]).abs().max()
    assert spread > 1e-3 * logits.abs().max()


@pytest.mark.parametrize("name", ["resnet20", "vgg8", "mobilenetv2", "squeezenet", "resnet18"])
def test_in_channels_is_the_first_convolutions_input(name: str):
    model = build_model(name, num_classes=3, in_channels=1)
    assert weighted_layers(model)[0].in_channels == 1
    with torch.no_grad():
        assert model.eval()(torch.randn(1, 1, 32, 32)).shape == (1, 3)


def test_default_in_channels_is_the_architectures():
    assert build_model("small_cnn").conv1.in_channels == 1
    assert build_model("resnet20").conv1.in_channels == 3


# ------------------------------------------------------------------------------- CIFAR ResNets
def test_resnet20_parameter_count_by_hand():
    # stem 3*16*9 + BN 2*16; stage 1: 6 convs 16*16*9, 6 BN of 16; stage 2: 16*32*9 + 5 * 32*32*9,
    # 6 BN of 32; stage 3: 32*64*9 + 5 * 64*64*9, 6 BN of 64; fc 64*10 + 10
    expected = (
        (432 + 32)
        + (6 * 2304 + 6 * 32)
        + (4608 + 5 * 9216 + 6 * 64)
        + (18432 + 5 * 36864 + 6 * 128)
        + 650
    )
    assert count(build_model("resnet20", num_classes=10)) == expected == 269_722


@pytest.mark.parametrize(
    "depth, millions", [(20, 0.27), (32, 0.46), (44, 0.66), (56, 0.85), (110, 1.7)]
)
def test_cifar_resnet_sizes_match_he_et_al_table_6(depth: int, millions: float):
    model = build_model(f"resnet{depth}", num_classes=10)
    assert round(count(model) / 1e6, 2 if depth < 110 else 1) == millions
    # depth counts the weighted layers: 6n + 1 convolutions and the classifier
    assert len(weighted_layers(model)) == depth


def test_option_a_shortcut_has_no_parameters_and_pads_zero_channels():
    model = build_model("resnet20")
    shortcuts = [m for m in model.modules() if isinstance(m, ChannelPadShortcut)]
    assert len(shortcuts) == 2  # the first block of stages 2 and 3
    assert all(count(s) == 0 for s in shortcuts)
    assert not any(isinstance(m, nn.Conv2d) and m.kernel_size == (1, 1) for m in model.modules())

    x = torch.arange(2 * 4 * 4, dtype=torch.float32).reshape(1, 2, 4, 4)
    out = ChannelPadShortcut(2, 6, stride=2)(x)
    assert out.shape == (1, 6, 2, 2)
    assert torch.equal(out[0, 2], torch.tensor([[0.0, 2.0], [8.0, 10.0]]))  # channel 0, every 2nd
    assert torch.equal(out[0, 3], torch.tensor([[16.0, 18.0], [24.0, 26.0]]))  # channel 1
    assert out[0, [0, 1, 4, 5]].abs().sum() == 0  # two zero channels on each side


def test_resnet20_stages_halve_the_map_twice():
    sizes = {}
    model = build_model("resnet20").eval()
    for name in ("layer1", "layer2", "layer3"):
        getattr(model, name).register_forward_hook(
            lambda m, i, o, name=name: sizes.__setitem__(name, tuple(o.shape[1:]))
        )
    with torch.no_grad():
        model(torch.randn(1, 3, 32, 32))
    assert sizes == {"layer1": (16, 32, 32), "layer2": (32, 16, 16), "layer3": (64, 8, 8)}


# ------------------------------------------------------------------------------------------ VGG
def test_vgg8_is_the_ewgs_layout():
    model = build_model("vgg8", num_classes=10)
    layers = weighted_layers(model)
    assert [m.out_channels for m in layers[:-1]] == [64, 128, 256, 512, 512]
    assert isinstance(layers[-1], nn.Linear) and layers[-1].in_features == 512
    # EWGS's names, so its float checkpoints load
    assert {"layer0.0.conv2d.weight", "layer4.0.bn.running_var", "classifier.weight"} <= set(
        model.state_dict()
    )


@pytest.mark.parametrize("name, convs", [("vgg11", 8), ("vgg13", 10)])
def test_vgg_depth(name: str, convs: int):
    layers = weighted_layers(build_model(name))
    assert len(layers) == convs + 1 and all(isinstance(m, nn.Conv2d) for m in layers[:-1])


@pytest.mark.parametrize("side", [32, 64])
def test_vgg_last_stage_sees_4x4_at_32_and_64_px(side: int):
    model = build_model("vgg8").eval()
    seen = []
    model.layer4.register_forward_hook(lambda m, i, o: seen.append(tuple(o.shape[-2:])))
    with torch.no_grad():
        model(torch.randn(1, 3, side, side))
    assert seen == [(4, 4)]


# ---------------------------------------------------------------------------------- MobileNetV2
def test_mobilenetv2_imagenet_configuration_has_torchvisions_size():
    # torchvision's mobilenet_v2 (1000 classes) has 3,504,872 parameters
    model = build_model("mobilenetv2", num_classes=1000, stem_stride=2)
    assert count(model) == 3_504_872


def test_mobilenetv2_has_depthwise_convolutions_and_17_blocks():
    model = build_model("mobilenetv2")
    depthwise = [
        m for m in model.modules() if isinstance(m, nn.Conv2d) and m.groups == m.in_channels > 1
    ]
    assert len(depthwise) == 17
    assert all(m.kernel_size == (3, 3) and m.out_channels == m.in_channels for m in depthwise)


def test_mobilenetv2_stem_stride_and_width():
    sizes = []
    for stem_stride in (1, 2):
        model = build_model("mobilenetv2", stem_stride=stem_stride).eval()
        model.features.register_forward_hook(lambda m, i, o: sizes.append(tuple(o.shape[1:])))
        with torch.no_grad():
            model(torch.randn(1, 3, 32, 32))
    assert sizes == [(1280, 2, 2), (1280, 1, 1)]
    narrow = build_model("mobilenetv2", width_mult=0.5)
    assert narrow.features[0][0].out_channels == 16  # 32 * 0.5
    assert count(narrow) < count(build_model("mobilenetv2")) / 2
    with pytest.raises(ValueError, match="stem_stride"):
        build_model("mobilenetv2", stem_stride=4)


# ------------------------------------------------------------------------- Tiny-ImageNet models
def test_resnet18_small_stem_keeps_64px_and_ends_at_8x8():
    model = build_model("resnet18", num_classes=200).eval()
    assert model.conv1.kernel_size == (3, 3) and model.conv1.stride == (1, 1)
    assert not any(isinstance(m, nn.MaxPool2d) for m in model.modules())
    seen = []
    model.layer4.register_forward_hook(lambda m, i, o: seen.append(tuple(o.shape[1:])))
    with torch.no_grad():
        model(torch.randn(1, 3, 64, 64))
    assert seen == [(512, 8, 8)]


@pytest.mark.parametrize(
    "name, expected",
    [
        ("resnet18", 11_689_512),
        ("resnet34", 21_797_672),
        ("shufflenetv2", 2_278_604),
        ("squeezenet", 1_235_496),
    ],
)
def test_imagenet_stem_has_torchvisions_size(name: str, expected: int):
    # torchvision's published parameter counts for 1000 classes
    assert count(build_model(name, num_classes=1000, stem="imagenet")) == expected


@pytest.mark.parametrize("name", ["resnet18", "shufflenetv2", "squeezenet"])
def test_unknown_stem_is_refused(name: str):
    with pytest.raises(ValueError, match="stem must be"):
        build_model(name, stem="huge")


def test_channel_shuffle_interleaves_two_groups():
    x = torch.arange(6.0).reshape(1, 6, 1, 1)
    assert channel_shuffle(x, 2).flatten().tolist() == [0, 3, 1, 4, 2, 5]


def test_squeezenet_classifier_is_a_convolution_and_fire_concatenates():
    model = build_model("squeezenet", num_classes=5)
    assert isinstance(weighted_layers(model)[-1], nn.Conv2d)
    fire = model.features[3]
    x = torch.randn(1, 64, 8, 8)
    with torch.no_grad():
        squeezed = torch.relu(fire.squeeze(x))
        expected = torch.cat(
            [torch.relu(fire.expand1x1(squeezed)), torch.relu(fire.expand3x3(squeezed))], 1
        )
        assert torch.allclose(fire(x), expected)


def test_small_cnn_parameter_count_by_hand():
    # convs 1*32*9 + 32*64*9 + 64*128*9, BN 2*(32+64+128), fc 128*10 + 10
    assert count(build_model("small_cnn")) == 288 + 18432 + 73728 + 448 + 1290 == 94_186
