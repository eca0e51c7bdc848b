"""FAQD: logit loss + weighted feature affinity (FA or FFA) through the student's adapters, on
the ResNet-20's stage outputs, label-free by default; checked on values, gradients, what a step
may change, and an exact resume with the FFA projection restored."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from sqakd.config import MethodConfig, TrainConfig, load_config
from sqakd.distill import fast_feature_affinity_loss, feature_affinity_loss
from sqakd.engine import RunLog, Trainer, safe_torch_load, teacher_for
from sqakd.methods import Batch, DataShapes, Models, Phase, build_method
from sqakd.models import build_model
from sqakd.quant import QuantPolicy, calibrate, prepare

SHAPES = DataShapes((3, 16, 16), 10, model_name="resnet20")
STAGES = ["layer1", "layer2", "layer3"]


def networks(seed: int = 0) -> tuple[nn.Module, nn.Module]:
    torch.manual_seed(seed)
    teacher = build_model("resnet20", num_classes=10)
    teacher.train()
    with torch.no_grad():  # real batch-norm statistics
        teacher(torch.randn(32, 3, 16, 16))
    student = prepare(copy.deepcopy(teacher), QuantPolicy(method="lsq", weight_bits=4, act_bits=4))
    return student.train(), teacher_for("features", teacher)


def faqd(*settings: str, student=None, teacher=None):
    method = build_method(load_config(None, ["method.name=faqd", *settings]).method)
    if student is None:
        student, teacher = networks()
    method.setup(Models(student, teacher), SHAPES)
    return method, student, teacher


def stage_maps(model: nn.Module, images: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """The logits and the three stage outputs, by a hand-written forward of the CIFAR ResNet."""
    out = F.relu(model.bn1(model.conv1(images)))
    maps = []
    for stage in (model.layer1, model.layer2, model.layer3):
        out = stage(out)
        maps.append(out)
    return model.fc(torch.flatten(model.avgpool(out), 1)), maps


def test_defaults_are_the_released_label_free_recipe():
    method = build_method(MethodConfig(name="faqd"))
    options = method.options
    assert (options.affinity, options.affinity_weight, options.logit_loss) == ("fa", 0.1, "mse")
    assert options.layers == "stages" and options.adapters and options.label_weight == 0
    assert method.needs.teacher == "features" and not method.needs.labels
    assert build_method(MethodConfig(name="faqd", label_weight=0.3)).needs.labels


@pytest.mark.parametrize("affinity", ["fa", "ffa"])
def test_losses_equal_the_formula_on_the_stage_outputs(affinity):
    method, student, teacher = faqd(f"method.affinity={affinity}")
    assert method.taps == STAGES
    images = torch.randn(4, 3, 16, 16)
    calibrate(student, [images])
    losses = method.losses(Models(student, teacher), Batch(images, size=4), Phase("train", 1))
    with torch.no_grad():
        logits, student_maps = stage_maps(student, images)
        teacher_logits, teacher_maps = stage_maps(teacher, images)
        expected_logit = F.mse_loss(logits, teacher_logits)
        terms = []
        adapted_maps = method.adapters(dict(zip(STAGES, student_maps)))
        for tap, t in zip(STAGES, teacher_maps):
            adapted = adapted_maps[tap]
            if affinity == "fa":
                terms.append(feature_affinity_loss(adapted, t))
            else:
                terms.append(
                    fast_feature_affinity_loss(adapted, t, method.affinity.projection(tap))
                )
        expected_affinity = 0.1 * sum(terms)
    assert set(losses) == {"mse", affinity}
    torch.testing.assert_close(losses["mse"].detach(), expected_logit)
    torch.testing.assert_close(losses[affinity].detach(), expected_affinity)
    assert losses[affinity] > 0


def test_kl_logit_loss_labels_and_the_logit_only_ablation():
    student, teacher = networks()
    images, labels = torch.randn(4, 3, 16, 16), torch.tensor([0, 1, 2, 3])
    calibrate(student, [images])
    models = Models(student, teacher)
    method, _, _ = faqd("method.logit_loss=kl", "method.temperature=3", "method.label_weight=0.3",
                        student=student, teacher=teacher)  # fmt: skip
    losses = method.losses(models, Batch(images, labels, size=4), Phase("train", 1))
    with torch.no_grad():
        logits, teacher_logits = student(images), teacher(images)
    assert set(losses) == {"kl", "fa", "ce"}
    torch.testing.assert_close(losses["kl"].detach(), F.kl_div(
        F.log_softmax(logits / 3, 1), F.log_softmax(teacher_logits / 3, 1),
        reduction="batchmean", log_target=True) * 9)  # fmt: skip
    torch.testing.assert_close(losses["ce"].detach(), 0.3 * F.cross_entropy(logits, labels))
    ablation, _, _ = faqd("method.affinity_weight=0", student=student, teacher=teacher)
    assert set(ablation.losses(models, Batch(images, size=4), Phase("train", 1))) == {"mse"}


def test_gradients_reach_the_student_and_adapters_never_the_teacher():
    method, student, teacher = faqd("method.affinity=ffa", "method.logit_weight=0")
    images = torch.randn(4, 3, 16, 16)
    calibrate(student, [images])
    losses = method.losses(Models(student, teacher), Batch(images, size=4), Phase("train", 1))
    sum(losses.values()).backward()  # the affinity term alone
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in method.adapters.parameters())
    assert student.layer1[0].conv1.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in teacher.parameters())


def trainer(tmp_path, method, student, teacher, batches, epochs=2, every=None) -> Trainer:
    return Trainer(student, teacher, method, batches,
                   TrainConfig(epochs=epochs, checkpoint_every_steps=every,
                               weights={"name": "sgd", "lr": 0.02}),
                   torch.device("cpu"), RunLog(tmp_path, enabled=False),
                   checkpoint_dir=tmp_path / "checkpoints", progress=False)  # fmt: skip


def batches(count: int = 3) -> list[tuple[torch.Tensor, None]]:
    generator = torch.Generator().manual_seed(4)
    return [(torch.randn(8, 3, 16, 16, generator=generator), None) for _ in range(count)]


def test_a_training_run_lowers_the_loss_and_trains_adapters_not_the_teacher(tmp_path):
    method, student, teacher = faqd("method.affinity=ffa")
    data = batches()
    calibrate(student, [data[0][0]])
    teacher_before = copy.deepcopy(teacher.state_dict())
    adapters_before = copy.deepcopy(method.adapters.state_dict())
    run = trainer(tmp_path, method, student, teacher, data, epochs=4)
    assert {id(p) for g in run.optimizers["adapters"].param_groups for p in g["params"]} == {
        id(p) for p in method.adapters.parameters()
    }
    history = run.fit().history
    assert history[-1]["train_loss"] < history[0]["train_loss"]
    assert all(
        not torch.equal(v, method.adapters.state_dict()[k]) for k, v in adapters_before.items()
    )
    assert all(torch.equal(v, teacher.state_dict()[k]) for k, v in teacher_before.items())


def test_a_resumed_ffa_run_is_bit_identical_with_its_projection_restored(tmp_path, fit_until):
    def fresh(folder, every=None):
        method, student, teacher = faqd("method.affinity=ffa", "method.projection_seed=7")
        data = batches()
        calibrate(student, [data[0][0]])
        return trainer(folder, method, student, teacher, data, every=every), method, student

    full, full_method, full_student = fresh(tmp_path / "full")
    full.fit()
    cut, _, _ = fresh(tmp_path / "cut", every=2)
    fit_until(cut, 4)
    state = safe_torch_load(tmp_path / "cut" / "checkpoints" / "last.pt")
    assert any(key.startswith("affinity.projections.") for key in state["method"])
    resumed, method, student = fresh(tmp_path / "resumed")
    for buffer in method.affinity.projections.buffers():
        buffer.zero_()  # only the checkpoint can bring the projection back
    resumed.resume(tmp_path / "cut" / "checkpoints" / "last.pt")
    resumed.fit()
    for mine, theirs in ((student, full_student), (method, full_method)):
        for key, value in theirs.state_dict().items():
            assert torch.equal(mine.state_dict()[key], value), key


def test_ffa_leaves_the_global_random_state_alone():
    """The released FFA reseeds the global RNG on every call, freezing every epoch's shuffle."""
    method, student, teacher = faqd("method.affinity=ffa")
    images = torch.randn(4, 3, 16, 16)
    calibrate(student, [images])
    with torch.no_grad():
        _, student_maps = stage_maps(student, images)
        _, teacher_maps = stage_maps(teacher, images)
    pairs = dict(zip(STAGES, student_maps)), dict(zip(STAGES, teacher_maps))
    state = torch.get_rng_state()
    method.affinity(*pairs)
    assert torch.equal(torch.get_rng_state(), state)


def test_bad_taps_are_one_line_errors():
    with pytest.raises(ValueError, match="no layer 'layr2'.*did you mean 'layer2'") as error:
        faqd("method.layers=[layer1, layr2]")
    assert "\n" not in str(error.value)
    student, teacher = networks()
    with pytest.raises(ValueError, match="name the modules to tap") as error:
        build_method(MethodConfig(name="faqd")).setup(
            Models(student, teacher), DataShapes((3, 16, 16), 10, model_name="mine.py:net")
        )
    assert "\n" not in str(error.value)
    with pytest.raises(ValueError, match="unknown config key 'method.affinty'"):
        load_config(None, ["method.name=faqd", "method.affinty=ffa"])
