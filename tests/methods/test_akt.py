"""AKT (and its baselines AdaDFQ and GDFQ): a generator trained on BNS and AdaDFQ's terms, then
the student on the same images with the logit term and RFD on the residual bodies; checked on
values, on what each update may change, on the warm-up, on an exact resume, and on bad input."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from sqakd import data as datasets
from sqakd.config import MethodConfig, OptimizerConfig, TrainConfig, load_config
from sqakd.distill import FeatureTaps, RefinedFeatureDistillation
from sqakd.engine import RunLog, Trainer, safe_torch_load, teacher_for
from sqakd.methods import Batch, DataShapes, Models, Phase, build_method
from sqakd.models import build_model
from sqakd.quant import QuantPolicy, calibrate, prepare, quantizers

SHAPES = DataShapes((3, 8, 8), 3, model_name="resnet20")
BODIES = [f"layer{s}.{b}.bn2" for s in (1, 2, 3) for b in range(3)]


def networks(seed: int = 0) -> tuple[nn.Module, nn.Module]:
    torch.manual_seed(seed)
    teacher = build_model("resnet20", num_classes=3)
    teacher.train()
    with torch.no_grad():  # batch-norm statistics of some "training data"
        teacher(torch.randn(32, 3, 8, 8))
    policy = QuantPolicy(method="minmax", weight_bits=4, act_bits=4, first_last="same",
                         per_channel_weights=True)  # fmt: skip
    student = prepare(copy.deepcopy(teacher), policy)
    return student.train(), teacher_for("features", teacher)


def akt(*settings: str, name: str = "akt", seed: int = 0, shapes: DataShapes = SHAPES):
    method = build_method(load_config(None, [f"method.name={name}", *settings]).method)
    student, teacher = networks(seed)
    method.setup(Models(student, teacher), shapes)
    # as the pipeline does: more batches than calibration takes (the rest are never drawn)
    calibrate(student, method.calibration_images(Batch(None, size=4) for _ in range(3)))
    assert torch.is_grad_enabled()
    return method, student, teacher


class RecordingStep:
    """A Step that runs backward on each update and keeps what it was given (no optimizer)."""

    def __init__(self, phase: Phase, check=None) -> None:
        self.phase, self.epoch, self.device = phase, 0, torch.device("cpu")
        self.updates: list[tuple[tuple[str, ...], dict[str, torch.Tensor]]] = []
        self.check = check

    def update(self, losses, groups=None):
        if self.check is not None:
            self.check(tuple(groups), losses)
        self.updates.append((tuple(groups), {k: v.detach() for k, v in losses.items()}))
        sum(losses.values()).backward()


def snapshot(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def parameters(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.named_parameters()}


def changed(before: dict, after: dict) -> set[str]:
    return {k for k in before if not torch.equal(before[k], after[k])}


# ----------------------------------------------------------------------------- the step
def test_rfd_is_nonzero_and_sends_gradient_into_the_student_on_a_real_step():
    method, student, teacher = akt()
    assert method.taps == BODIES  # each residual body's output, before the shortcut is added
    generated = []
    method.generator.register_forward_hook(lambda m, a, out: generated.append(out.detach()))
    first_conv = student.layer1[0].conv1.weight  # upstream of every tap

    def check(groups, losses):
        if groups == ("weights", "quantizers"):
            assert float(losses["rfd"].detach()) > 0
            (gradient,) = torch.autograd.grad(losses["rfd"], [first_conv], retain_graph=True)
            assert gradient.abs().sum() > 0

    step = RecordingStep(Phase("train", 1), check)
    method.enter_phase(Models(student, teacher), step.phase)  # what the trainer does
    losses = method.training_step(Models(student, teacher), Batch(None, size=4), step)
    assert [groups for groups, _ in step.updates] == [("generator",), ("weights", "quantizers")]
    assert set(losses) == {"g_margin", "g_disagreement", "g_agreement", "g_bns", "entropy", "rfd"}
    assert all(p.grad is None for p in teacher.parameters())
    # the value: 1000 x RFD of the student's and the teacher's maps on the same images
    (images,) = generated
    with torch.no_grad():
        teacher_logits, teacher_maps = FeatureTaps(teacher, BODIES)(images)
        student_logits, student_maps = FeatureTaps(student, BODIES)(images)
    expected = 1000 * RefinedFeatureDistillation(8.0)(student_maps, teacher_maps)
    torch.testing.assert_close(losses["rfd"], expected)
    p = F.softmax((teacher_logits - student_logits) / 20, dim=1)
    torch.testing.assert_close(losses["entropy"], 400 * (p * p.log()).sum(dim=1).mean())


def test_the_generator_loss_is_adadfqs_and_reaches_the_generator_through_both_networks():
    method, student, teacher = akt()

    def check(groups, losses):
        if groups == ("generator",):
            for name in ("g_margin", "g_disagreement", "g_agreement", "g_bns"):
                grads = torch.autograd.grad(
                    losses[name], list(method.generator.parameters()),
                    retain_graph=True, allow_unused=True,
                )  # fmt: skip
                assert any(g is not None and g.abs().sum() > 0 for g in grads), name

    step = RecordingStep(Phase("warmup", 1, trains=("generator",)), check)
    method.enter_phase(Models(student, teacher), step.phase)  # what the trainer does
    losses = method.training_step(Models(student, teacher), Batch(None, size=5), step)
    assert [groups for groups, _ in step.updates] == [("generator",)]  # warm-up: no student
    assert not losses["rfd"].requires_grad and float(losses["rfd"]) > 0  # only measured
    assert float(losses["g_bns"].detach()) > 0 and float(losses["g_disagreement"].detach()) > 0


def trainer_for(method, student, teacher, tmp_path, epochs=2, steps=2, **train) -> Trainer:
    config = TrainConfig(
        epochs=epochs,
        weights=OptimizerConfig(name="sgd", lr=1e-2, nesterov=True, weight_decay=1e-4),
        **train,
    )
    return Trainer(student, teacher, method, datasets.SizeOnlyBatches(4, steps), config,
                   torch.device("cpu"), RunLog(tmp_path, enabled=False),
                   checkpoint_dir=tmp_path / "checkpoints", progress=False)  # fmt: skip


def test_each_update_changes_only_its_own_groups_and_the_warmup_only_the_generator(tmp_path):
    method, student, teacher = akt("method.warmup_epochs=1")
    trainer = trainer_for(method, student, teacher, tmp_path)
    assert set(trainer.optimizers) == {"weights", "generator"}  # minmax ranges: no parameters
    assert trainer.optimizers["generator"].defaults["lr"] == 1e-3
    assert type(trainer.optimizers["generator"]).__name__ == "Adam"
    records = []
    original = trainer.update

    def update(losses, phase, groups=None):
        before = (parameters(method.generator), parameters(student))
        original(losses, phase, groups)
        after = (parameters(method.generator), parameters(student))
        records.append((phase.name, groups, bool(changed(before[0], after[0])),
                        bool(changed(before[1], after[1]))))  # fmt: skip

    trainer.update = update
    ranges = [q for _, q in quantizers(student) if q.role == "activation"]
    start = snapshot(student)
    teacher_start = snapshot(teacher)
    epoch_states = []
    trainer.epoch_hooks = [lambda epoch, **_: epoch_states.append(snapshot(student))]
    trainer.fit()
    end = snapshot(student)
    warmup = [("warmup", ("generator",), True, False)] * 2
    train = [("train", ("generator",), True, False),
             ("train", ("weights", "quantizers"), False, True)] * 2  # fmt: skip
    assert records == warmup + train
    # the student's batch norms ran in eval mode: statistics untouched, affine parameters trained
    statistics = {k for k in start if k.endswith(("running_mean", "running_var"))}
    assert statistics and not changed({k: start[k] for k in statistics}, end)
    assert {"layer1.0.bn2.weight", "layer1.0.bn2.bias"} <= changed(start, end)
    # activation ranges: tracked on the generated batches during the warm-up, frozen after it
    range_keys = {k for k in start if k.endswith(("min_value", "max_value")) and "act_" in k}
    assert range_keys and changed(
        {k: start[k] for k in range_keys}, {k: epoch_states[1][k] for k in range_keys}
    )
    assert not changed({k: epoch_states[1][k] for k in range_keys}, end)
    assert all(bool(q.frozen) for q in ranges)
    assert not changed(teacher_start, snapshot(teacher))
    assert trainer.result.history[0]["phase"] == "warmup"
    # the warm-up measures the student's losses without stepping it: the same log columns
    assert set(trainer.result.history[0]) == set(trainer.result.history[1])
    assert trainer.result.history[1]["train_rfd"] > 0


def interrupted_and_full(tmp_path):
    def make(folder, **train):
        method, student, teacher = akt("method.warmup_epochs=1")
        return trainer_for(method, student, teacher, tmp_path / folder, **train), method, student

    full, full_method, full_student = make("full")
    full.fit()
    cut, _, _ = make("cut", checkpoint_every_steps=1)
    original = cut.train_step

    def stop_at_three(batch):
        if cut.step == 3:  # epoch 2 (phase train), batch 2: the checkpoint of step 3 is kept
            raise KeyboardInterrupt
        return original(batch)

    cut.train_step = stop_at_three
    with pytest.raises(KeyboardInterrupt):
        cut.fit()
    return full, full_method, full_student, make


def test_a_resumed_run_restores_the_generator_and_its_optimizer_bit_exactly(tmp_path):
    full, full_method, full_student, make = interrupted_and_full(tmp_path)
    state = safe_torch_load(tmp_path / "cut" / "checkpoints" / "last.pt")
    assert (state["epoch"], state["batch_in_epoch"]) == (1, 1)
    assert any(key.startswith("generator.") for key in state["method"])
    resumed, method, student = make("resumed")
    resumed.resume(tmp_path / "cut" / "checkpoints" / "last.pt")
    assert resumed.phase.name == "train"
    result = resumed.fit()
    for mine, theirs in ((method, full_method), (student, full_student)):
        for key, value in theirs.state_dict().items():
            assert torch.equal(mine.state_dict()[key], value), key
    mine = resumed.optimizers["generator"].state_dict()["state"]
    theirs = full.optimizers["generator"].state_dict()["state"]
    assert mine.keys() == theirs.keys()
    for index, values in theirs.items():
        for name, value in values.items():
            assert torch.equal(mine[index][name], value), (index, name)
    assert [r["train_loss"] for r in result.history] == [
        r["train_loss"] for r in full.result.history
    ]


# ---------------------------------------------------------------------------- variants
def test_adadfq_is_akt_without_rfd_and_gdfq_has_its_own_losses():
    method, student, teacher = akt(name="adadfq")
    assert method.options.rfd_weight == 0 and method.taps == []
    step = RecordingStep(Phase("train", 1))
    method.enter_phase(Models(student, teacher), step.phase)  # what the trainer does
    losses = method.training_step(Models(student, teacher), Batch(None, size=4), step)
    assert set(losses) == {"g_margin", "g_disagreement", "g_agreement", "g_bns", "entropy"}
    method, student, teacher = akt(name="gdfq")
    options = method.options
    assert (options.bns_weight, options.logit_loss, options.temperature) == (0.1, "kl", 20.0)
    step = RecordingStep(Phase("train", 1))
    method.enter_phase(Models(student, teacher), step.phase)  # what the trainer does
    losses = method.training_step(Models(student, teacher), Batch(None, size=4), step)
    assert set(losses) == {"g_ce", "g_bns", "kl", "ce"}
    assert method.needs.data == "none" and not method.needs.labels


def test_the_papers_mean_and_alpha_mix_are_options():
    method, student, teacher = akt("method.layer_reduction=mean", "method.alpha=0.5",
                                   "method.logit_loss=kl")  # fmt: skip
    step = RecordingStep(Phase("train", 1))
    method.enter_phase(Models(student, teacher), step.phase)  # what the trainer does
    losses = method.training_step(Models(student, teacher), Batch(None, size=4), step)
    assert set(losses) == {"g_margin", "g_disagreement", "g_agreement", "g_bns", "kl", "rfd"}
    assert float(losses["rfd"].detach()) > 0 and float(losses["kl"].detach()) >= 0


def test_stages_or_named_layers_can_be_tapped_instead():
    method, _, _ = akt("method.layers=stages")
    assert method.taps == ["layer1", "layer2", "layer3"]
    method, _, _ = akt("method.layers=[layer2.1.bn2]")
    assert method.taps == ["layer2.1.bn2"]


# --------------------------------------------------------------------------- bad input
def test_bad_input_is_a_one_line_error():
    with pytest.raises(ValueError, match="margin_low") as error:
        load_config(None, ["method.name=akt", "method.margin_low=0.9", "method.margin_high=0.2"])
    assert "\n" not in str(error.value)
    method = build_method(MethodConfig(name="akt"))
    with pytest.raises(ValueError, match="warmup_epochs is 4.*train.epochs = 3") as error:
        method.phases(3)
    assert "\n" not in str(error.value)
    assert [p.name for p in method.phases(5)] == ["warmup", "train"]

    torch.manual_seed(0)
    no_batchnorm = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                                 nn.Flatten(), nn.Linear(4, 3)).eval().requires_grad_(False)  # fmt: skip
    student = prepare(copy.deepcopy(no_batchnorm), QuantPolicy(method="minmax"))
    with pytest.raises(ValueError, match="no BatchNorm2d layer.*bns_weight=0") as error:
        build_method(MethodConfig(name="akt")).setup(Models(student, no_batchnorm), SHAPES)
    assert "\n" not in str(error.value)

    fixed = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
                          nn.Flatten(), nn.Linear(4 * 8 * 8, 3)).eval().requires_grad_(False)  # fmt: skip
    student = prepare(copy.deepcopy(fixed), QuantPolicy(method="minmax"))
    bigger = DataShapes((3, 12, 12), 3, model_name="x")
    with pytest.raises(
        ValueError, match=r"cannot take generated images of shape \(3, 12, 12\)"
    ) as error:
        build_method(MethodConfig(name="akt", layers=["2"])).setup(Models(student, fixed), bigger)
    assert "\n" not in str(error.value)
    with pytest.raises(ValueError, match="multiples of 4.*10x10") as error:
        build_method(MethodConfig(name="akt", layers=["2"])).setup(
            Models(student, fixed), DataShapes((3, 10, 10), 3)
        )
    assert "\n" not in str(error.value)


def test_ptq_on_generated_images_trains_the_generator_and_only_tracks_the_students_ranges(
    tmp_path,
):
    method, student, teacher = akt(name="ptq_generated")
    trainer = trainer_for(method, student, teacher, tmp_path, epochs=1)
    before, generator_before = snapshot(student), parameters(method.generator)
    trainer.fit()
    after = snapshot(student)
    moved = changed(before, after)
    assert moved and all(k.endswith(("min_value", "max_value")) for k in moved)
    assert changed(generator_before, parameters(method.generator)) == set(generator_before)
    assert {"train_g_ce", "train_g_bns", "train_kl", "train_ce"} <= set(trainer.result.history[0])
