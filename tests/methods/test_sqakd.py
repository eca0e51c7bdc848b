import copy

import pytest
import torch
from torch import nn

from sqakd.config import MethodConfig, TrainConfig
from sqakd.distill import kd_kl_divergence
from sqakd.engine import RunLog, Trainer, TrainingDiverged
from sqakd.methods import StepOutput, build_method
from sqakd.quant import QuantPolicy, calibrate, model_parameters, prepare, quantizer_parameters


def small_net(classes: int = 10) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Conv2d(8, 16, 3, padding=1, stride=2),
        nn.BatchNorm2d(16),
        nn.ReLU(),
        nn.Conv2d(16, 16, 3, padding=1),
        nn.BatchNorm2d(16),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(16, classes),
    )


def student_of(teacher: nn.Module, bits: int = 2, method: str = "ewgs") -> nn.Module:
    return prepare(teacher, QuantPolicy(method=method, weight_bits=bits, act_bits=bits))


class NoLabels:
    """A loader whose labels may not be read: yields (images, None)."""

    def __init__(self, batches):
        self.batches = batches

    def __iter__(self):
        return ((images, None) for images in self.batches)

    def __len__(self):
        return len(self.batches)


def trainer_for(student, teacher, method, loader, tmp_path, **train):
    config = TrainConfig(**{"epochs": 1, **train})
    return Trainer(
        student,
        teacher,
        method,
        loader,
        config,
        torch.device("cpu"),
        RunLog(tmp_path, enabled=False),
        progress=False,
    )


def test_default_sqakd_reads_no_labels_and_needs_teacher():
    method = build_method(MethodConfig())
    assert method.needs_teacher and not method.needs_labels
    assert build_method(MethodConfig(gamma=0.5)).needs_labels


def test_loss_is_alpha_t2_kl_plus_gamma_ce():
    teacher = small_net().eval()
    student = student_of(teacher)
    images, labels = torch.randn(4, 3, 16, 16), torch.tensor([0, 1, 2, 3])
    calibrate(student, [images])
    method = build_method(MethodConfig(alpha=0.7, gamma=0.3, temperature=3.0))
    output = method.training_step(student, teacher, images, labels)
    with torch.no_grad():
        expected_kd = 0.7 * kd_kl_divergence(output.logits, teacher(images), 3.0)
        expected_ce = 0.3 * nn.functional.cross_entropy(output.logits, labels)
    torch.testing.assert_close(output.losses["kd"].detach(), expected_kd)
    torch.testing.assert_close(output.losses["ce"].detach(), expected_ce)
    assert set(output.losses) == {"kd", "ce"}


def test_gamma_needs_labels_and_all_zero_is_refused():
    teacher = small_net().eval()
    method = build_method(MethodConfig(gamma=1.0))
    with pytest.raises(ValueError, match="needs labels"):
        method.training_step(student_of(teacher), teacher, torch.randn(2, 3, 8, 8), None)
    with pytest.raises(ValueError, match="nothing to train"):
        build_method(MethodConfig(alpha=0, gamma=0, beta=0))


def test_optimizers_hold_the_right_parameters(tmp_path):
    teacher = small_net().eval()
    student = student_of(teacher)
    trainer = trainer_for(
        student,
        teacher,
        build_method(MethodConfig()),
        NoLabels([torch.randn(2, 3, 8, 8)]),
        tmp_path,
    )
    weights = {id(p) for g in trainer.optimizers["weights"].param_groups for p in g["params"]}
    quant = {id(p) for g in trainer.optimizers["quantizers"].param_groups for p in g["params"]}
    assert weights == {id(p) for p in model_parameters(student)}
    assert quant == {id(p) for p in quantizer_parameters(student)} and quant
    assert not weights & quant
    assert trainer.optimizers["weights"].param_groups[0]["lr"] == 1e-3
    assert trainer.optimizers["quantizers"].param_groups[0]["lr"] == 1e-5
    assert trainer.optimizers["weights"].param_groups[0]["weight_decay"] == 1e-4


def test_training_lowers_kl_and_leaves_teacher_untouched(tmp_path, cifar_images):
    teacher = small_net().eval()
    # give the teacher real BN statistics so it is a sensible target
    teacher.train()
    with torch.no_grad():
        teacher(cifar_images)
        teacher[-1].weight.mul_(20)  # confident teacher: a target far from uniform
    teacher.eval()
    before = copy.deepcopy(teacher.state_dict())
    student = student_of(teacher, bits=2).train()
    calibrate(student, [cifar_images[:64]])
    batches = list(cifar_images.split(64))
    method = build_method(MethodConfig())
    trainer = trainer_for(student, teacher, method, NoLabels(batches), tmp_path, epochs=6)

    def kl() -> float:  # the training objective, measured the way it is trained (batch statistics)
        with torch.no_grad():
            return sum(kd_kl_divergence(student(b), teacher(b)).item() for b in batches) / len(
                batches
            )

    start = kl()
    trainer.fit()
    assert kl() < 0.9 * start
    for key, value in teacher.state_dict().items():
        torch.testing.assert_close(value, before[key], rtol=0, atol=0)
    assert all(p.grad is None for p in teacher.parameters())


def test_trainer_checkpoint_round_trip_restores_outputs(tmp_path):
    teacher = small_net().eval()
    images = torch.randn(8, 3, 8, 8)
    student = student_of(teacher, bits=4)
    calibrate(student, [images])
    trainer = trainer_for(
        student, teacher, build_method(MethodConfig()), NoLabels([images]), tmp_path, epochs=2
    )
    trainer.fit()
    state = copy.deepcopy(trainer.state_dict())
    twin = student_of(small_net(), bits=4)
    twin_trainer = trainer_for(
        twin, teacher, build_method(MethodConfig()), NoLabels([images]), tmp_path, epochs=2
    )
    twin_trainer.load_state_dict(state)
    student.eval(), twin.eval()
    torch.testing.assert_close(twin(images), student(images), rtol=0, atol=0)
    assert twin_trainer.epoch == 2 and twin_trainer.step == 2


def test_nan_loss_stops_with_a_clear_message(tmp_path):
    class Broken(build_method(MethodConfig(name="qat")).__class__):
        def training_step(self, student, teacher, images, labels):
            logits = student(images)
            return StepOutput(logits, {"ce": logits.sum() * float("nan")})

    student = prepare(small_net(), QuantPolicy())
    loader = [(torch.randn(2, 3, 8, 8), torch.tensor([0, 1]))]
    trainer = Trainer(
        student,
        None,
        Broken(MethodConfig(name="qat")),
        loader,
        TrainConfig(),
        torch.device("cpu"),
        RunLog(tmp_path, enabled=False),
        progress=False,
    )
    with pytest.raises(TrainingDiverged, match="loss became nan.*train.grad_clip"):
        trainer.fit()
