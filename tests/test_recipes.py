"""Every recipe family in configs/ parses, every cell's configuration validates, and each family
builds its model (with the data set's class count) and a prepared student for every distinct
quantizer x bit-width it lists. Nothing trains."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from sqakd import models
from sqakd.bench import cell_config, is_ptq, load_family, teacher_config
from sqakd.quant import prepare, quantized_layers

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
FAMILIES = sorted(CONFIGS.glob("*.yaml"))
#: the classes of each data set the recipes name (CIFAR-10 (JPEG copy) is CIFAR-10)
CLASSES = {"CIFAR-10": 10, "CIFAR-100": 100, "Tiny-ImageNet-200": 200}
#: what the paper's scripts list per family: (quantizers, bit-widths)
PAPER_CELLS = {
    "cifar10_resnet20": ({"ewgs", "pact", "lsq", "dorefa"}, {1, 2, 4}),
    "cifar10_vgg8": ({"ewgs"}, {2}),
    "cifar100_resnet32": ({"ewgs"}, {1, 2, 4}),
    "cifar100_vgg13": ({"ewgs"}, {1, 2, 4}),
    "tinyimagenet_resnet18": ({"pact", "lsq", "dorefa"}, {3, 4, 8}),
    "tinyimagenet_vgg11": ({"pact", "lsq", "dorefa"}, {3, 4, 8}),
    "tinyimagenet_mobilenetv2": ({"pact", "lsq", "dorefa"}, {3, 4, 8}),
    "tinyimagenet_shufflenetv2": ({"pact", "lsq", "dorefa"}, {4, 8}),
    "tinyimagenet_squeezenet": ({"lsq", "dorefa"}, {4, 8}),
}
#: families beyond the paper's tables: (quantizers, bit-widths, the methods of every cell)
COMPARISON_CELLS = {
    "cifar10_resnet20_qkd": ({"lsq"}, {2, 3, 4}, {"qat", "sqakd", "qkd"}),
    "cifar10_resnet20_faqd": ({"ewgs"}, {2, 4}, {"qat", "sqakd", "faqd"}),
    "cifar10_resnet20_akt": ({"minmax"}, {3, 4, 5}, {"ptq_generated", "gdfq", "adadfq", "akt"}),
    "cifar10_resnet20_kdzoo": ({"ewgs"}, {2}, {"qat", "sqakd", "feature_kd"}),
    "cifar10_resnet110_resnet20_faqd": ({"binary", "ternary", "faqd4"}, {1, 2, 4}, {"faqd"}),
    "cifar10_resnet20_ptq": ({"lsq", "ewgs"}, {4, 8}, {"qat", "sqakd"}),
}
#: data-free methods: no training image, 200 generated batches per epoch (released)
ZERO_SHOT = {"ptq_generated", "gdfq", "adadfq", "akt"}
#: the SQAKD Table-7 zoo: every loss of the released scripts, with labels and label-free
KD_ZOO = {"at", "nst", "sp", "rkd", "crd", "fitnet", "cc", "vid", "fsp", "ft"}


def test_the_kd_zoo_lists_every_loss_with_and_without_labels() -> None:
    family = load_family(CONFIGS / "cifar10_resnet20_kdzoo.yaml")
    variants = {cell.name.removeprefix("ewgs_w2a2_feature_kd_") for cell in family.cells
                if cell.method == "feature_kd"}  # fmt: skip
    assert variants == KD_ZOO | {f"{loss}-free" for loss in KD_ZOO} | {"kd"}


def test_the_ptq_family_lists_each_observer_beside_qat_and_sqakd() -> None:
    family = load_family(CONFIGS / "cifar10_resnet20_ptq.yaml")
    observers = {"native", "minmax", "percentile", "mse"}
    for quantizer in ("lsq", "ewgs"):
        for bits in (8, 4):
            prefix = f"{quantizer}_w{bits}a{bits}_"
            names = {cell.name.removeprefix(prefix) for cell in family.cells
                     if cell.name.startswith(prefix)}  # fmt: skip
            assert names == {"qat", "sqakd"} | {f"sqakd_ptq-{o}" for o in observers}
    for cell in family.cells:
        config = cell_config(family, cell, Path("out"), Path("t"))
        ptq = cell.name.partition("_ptq-")[2]
        assert is_ptq(cell) == bool(ptq) and config.quant.observer == (ptq or "native")


def test_every_paper_family_has_a_recipe() -> None:
    assert {path.stem for path in FAMILIES} == set(PAPER_CELLS) | set(COMPARISON_CELLS)


@pytest.fixture(params=FAMILIES, ids=lambda path: path.stem)
def family(request: pytest.FixtureRequest):
    return load_family(request.param)


def test_the_family_lists_each_cell_with_and_without_sqakd(family) -> None:
    if family.name in COMPARISON_CELLS:
        quantizers, bits, methods = COMPARISON_CELLS[family.name]
    else:
        (quantizers, bits), methods = PAPER_CELLS[family.name], {"qat", "sqakd"}
    assert {cell.quantizer for cell in family.cells} == quantizers
    assert {cell.weight_bits for cell in family.cells} == bits
    pairs: dict[tuple[str, int, int], set[str]] = {}
    for cell in family.cells:
        pairs.setdefault((cell.quantizer, cell.weight_bits, cell.act_bits), set()).add(cell.method)
    assert all(listed == methods for listed in pairs.values()), pairs


def test_every_cell_is_a_valid_configuration_at_the_papers_budget(family, tmp_path: Path) -> None:
    teacher = teacher_config(family, tmp_path)
    assert teacher.train.epochs >= 100 and teacher.train.weights.name == "sgd"
    assert teacher.train.max_steps_per_epoch is None  # the teacher sees its whole training set
    for cell in family.cells:
        config = cell_config(family, cell, tmp_path, tmp_path / "teacher.safetensors")
        assert config.model.num_classes == CLASSES[family.dataset.name.split(" ")[0]]
        if is_ptq(cell):  # post-training quantization: calibrate and evaluate
            assert config.train.epochs == 0
        else:
            assert config.train.epochs == teacher.train.epochs or family.name.startswith("tiny")
        options = config.method.options  # each cell keeps only its method's keys
        if cell.method == "sqakd":
            assert options["gamma"] == 0.0  # SQAKD never reads a label
            assert options["temperature"] == 4.0
        elif cell.method == "faqd":  # label-free, FA by default; the variants change one key
            assert options["label_weight"] == 0.0 and options["logit_loss"] == "mse"
            variant = cell.name.removeprefix(
                f"{cell.quantizer}_w{cell.weight_bits}a{cell.act_bits}_faqd"
            )
            expected = {"": ("fa", 0.1), "_ffa": ("ffa", 0.1), "_logit-only": ("fa", 0.0)}[variant]
            assert (options["affinity"], options["affinity_weight"]) == expected
        elif cell.method == "feature_kd":  # one loss per variant, at its released weight
            variant = cell.name.removeprefix(
                f"{cell.quantizer}_w{cell.weight_bits}a{cell.act_bits}_feature_kd_"
            )
            loss, _, free = variant.partition("-")
            assert options["loss"] == loss and options.get("loss_weight") is None
            assert options["labels"] is (free != "free") and options["temperature"] == 4.0
        elif cell.method == "qkd":
            assert options["temperature"] == 2.0 and options["labels"] is True
            assert (options["self_study_epochs"], options["co_study_epochs"]) == (0.15, 0.5)
        elif cell.method in ZERO_SHOT:
            assert config.train.max_steps_per_epoch == 200 and config.data.batch_size == 200
            assert config.quant.first_last == "same" and options["warmup_epochs"] == 4
            assert options["rfd_weight"] == (1000.0 if cell.method == "akt" else 0.0)
            assert options["temperature"] == 20.0
        else:
            assert cell.method == "qat" and options == {}
        assert config.data.root.name in {"cifar10", "cifar100", "tiny-imagenet-200"}


def test_the_model_and_its_prepared_students_build(family, tmp_path: Path) -> None:
    base = cell_config(family, family.cells[0], tmp_path, tmp_path / "t")
    size = family.dataset.image_size
    model = models.build_model(base.model.name, num_classes=base.model.num_classes, in_channels=3)
    model.eval()
    with torch.no_grad():
        logits = model(torch.randn(2, 3, size, size))
    assert logits.shape == (2, base.model.num_classes)

    seen = set()
    for cell in family.cells:
        key = (cell.quantizer, cell.weight_bits, cell.act_bits)
        if key in seen:
            continue
        seen.add(key)
        policy = cell_config(family, cell, tmp_path, tmp_path / "t").quant
        student = prepare(model, policy)
        layers = [layer for _, layer in quantized_layers(student)]
        inner = [
            layer for layer in layers if layer.weight_quantizer is not None
            and layer.weight_quantizer.bits == cell.weight_bits
        ]  # fmt: skip
        assert inner, f"{cell.name}: no layer quantized at {cell.weight_bits} bits"
        edge_bits = {8} if policy.first_last == "8bit" else set()
        assert all(
            layer.weight_quantizer is None
            or layer.weight_quantizer.bits in {cell.weight_bits} | edge_bits
            for layer in layers
        )
        assert len(inner) >= len(layers) - 2  # only the first and last layer may differ
