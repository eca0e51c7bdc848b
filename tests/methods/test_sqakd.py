import copy

import pytest
import torch
from torch import nn

from sqakd.config import MethodConfig, TrainConfig
from sqakd.distill import kd_kl_divergence
from sqakd.engine import RunLog, Trainer, TrainingDiverged, teacher_for
from sqakd.methods import Batch, Models, Phase, build_method
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
    assert method.needs.teacher == "logits" and not method.needs.labels
    assert build_method(MethodConfig(gamma=0.5)).needs.labels
    assert build_method(MethodConfig(name="qat")).needs.teacher == "none"


def test_loss_is_alpha_t2_kl_plus_gamma_ce():
    teacher = small_net().eval()
    student = student_of(teacher)
    images, labels = torch.randn(4, 3, 16, 16), torch.tensor([0, 1, 2, 3])
    calibrate(student, [images])
    method = build_method(MethodConfig(alpha=0.7, gamma=0.3, temperature=3.0))
    models = Models(student, teacher_for("logits", teacher))
    losses = method.losses(models, Batch(images, labels, size=4), Phase("train", 1))
    with torch.no_grad():
        logits = student(images)
        expected_kd = 0.7 * kd_kl_divergence(logits, teacher(images), 3.0)
        expected_ce = 0.3 * nn.functional.cross_entropy(logits, labels)
    torch.testing.assert_close(losses["kd"].detach(), expected_kd)
    torch.testing.assert_close(losses["ce"].detach(), expected_ce)
    assert set(losses) == {"kd", "ce"}


def test_all_zero_weights_and_a_missing_extra_loss_are_refused():
    with pytest.raises(ValueError, match="nothing to train"):
        build_method(MethodConfig(alpha=0, gamma=0, beta=0))
    with pytest.raises(ValueError, match="method.extra_loss"):
        build_method(MethodConfig(beta=1.0))
    with pytest.raises(ValueError, match="'method.extra_loss'.*not a registered loss"):
        build_method(MethodConfig(beta=1.0, extra_loss="nope"))


def test_optimizers_hold_the_right_parameters(tmp_path):
    teacher = small_net().eval()
    student = student_of(teacher)
    trainer = trainer_for(
        student,
        teacher_for("logits", teacher),
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
    student = student_of(teacher, bits=2).train()
    teacher = teacher_for("features", teacher)  # frozen and unfolded: its state is comparable
    before = copy.deepcopy(teacher.state_dict())
    calibrate(student, [cifar_images[:64]])
    batches = list(cifar_images.split(64))
    method = build_method(MethodConfig())
    trainer = trainer_for(student, teacher, method, NoLabels(batches), tmp_path, epochs=6)
    assert method.needs.teacher == "logits"  # a features-role copy is frozen too: accepted

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
    network = small_net()
    teacher = teacher_for("logits", network)
    images = torch.randn(8, 3, 8, 8)
    student = student_of(network, bits=4)
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
        def losses(self, models, batch, phase):
            return {"ce": models.student(batch.images).sum() * float("nan")}

    student = prepare(small_net(), QuantPolicy())
    loader = [(torch.randn(2, 3, 8, 8), torch.tensor([0, 1]))]
    trainer = Trainer(
        student,
        None,
        Broken(),
        loader,
        TrainConfig(),
        torch.device("cpu"),
        RunLog(tmp_path, enabled=False),
        progress=False,
    )
    with pytest.raises(TrainingDiverged, match="loss became nan.*train.grad_clip"):
        trainer.fit()
