"""QKD on what it computes: which network runs and changes in each phase, the exact gradients of
co-studying, the loss values, the phase plan, an exact resume in the middle of co-studying, the
label-free variant that reads no label, and the one-line errors. End-to-end runs of the real
command line are in tests/engine/test_qkd_runs.py (they share the engine's tiny data)."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from sqakd.config import OptimizerConfig, TrainConfig, load_config
from sqakd.distill import kd_kl_divergence
from sqakd.engine import RunLog, Trainer, safe_torch_load, teacher_for
from sqakd.methods import Batch, Models, Phase, build_method, phase_at
from sqakd.methods.qkd import QKD, QKDOptions
from sqakd.quant import QuantPolicy, calibrate, prepare


# ------------------------------------------------------------------------------- helpers
def network() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1),
        nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 3),
    )  # fmt: skip


def labeled_batches(count: int = 3) -> list[tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(1)
    return [
        (torch.randn(6, 3, 8, 8, generator=generator), torch.randint(0, 3, (6,), generator=generator))
        for _ in range(count)
    ]  # fmt: skip


def student_and_teacher() -> tuple[nn.Module, nn.Module]:
    base = network()
    student = prepare(
        copy.deepcopy(base), QuantPolicy(method="lsq", weight_bits=4, act_bits=4)
    ).train()
    calibrate(student, [labeled_batches(1)[0][0]])
    return student, teacher_for("trainable", base)


def qkd(**options) -> QKD:
    return QKD(QKDOptions(**options))


def make_trainer(method, student, teacher, loader, tmp_path, epochs, hooks=(), **train) -> Trainer:
    return Trainer(student, teacher, method, loader, TrainConfig(epochs=epochs, **train),
                   torch.device("cpu"), RunLog(tmp_path, enabled=False),
                   checkpoint_dir=tmp_path / "checkpoints", progress=False,
                   epoch_hooks=hooks)  # fmt: skip


def snapshot(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def changed(before: dict, after: dict, keys=None) -> set[str]:
    return {k for k in (keys or before) if not torch.equal(before[k], after[k])}


class TeacherWatch:
    """Counts the teacher's forwards with the mode and autograd state of each, and snapshots
    both networks as each epoch starts (an epoch hook that runs no loss)."""

    def __init__(self, student: nn.Module, teacher: nn.Module) -> None:
        self.student, self.teacher = student, teacher
        self.calls: list[tuple[bool, bool]] = []
        self.epochs: list[tuple[int, dict, dict]] = []  # (forwards so far, student, teacher)
        teacher.register_forward_hook(
            lambda module, args, output: self.calls.append(
                (module.training, torch.is_grad_enabled())
            )
        )

    def __call__(self, epoch, model, loss, batches) -> None:
        self.epochs.append((len(self.calls), snapshot(self.student), snapshot(self.teacher)))

    def finish(self) -> None:
        self.epochs.append((len(self.calls), snapshot(self.student), snapshot(self.teacher)))

    def forwards(self, epoch: int) -> list[tuple[bool, bool]]:
        return self.calls[self.epochs[epoch][0] : self.epochs[epoch + 1][0]]


# ------------------------------------------------------------------------------ the phases
def run_all_phases(tmp_path: Path, labels: bool = True, loader=None):
    """4 epochs of 3 batches: self-studying 1, co-studying 2, tutoring 1."""
    student, teacher = student_and_teacher()
    watch = TeacherWatch(student, teacher)
    method = qkd(self_study_epochs=1, co_study_epochs=2, labels=labels)
    loader = loader if loader is not None else labeled_batches()
    trainer = make_trainer(method, student, teacher, loader, tmp_path, 4, hooks=[watch])
    result = trainer.fit()
    watch.finish()
    return trainer, result, watch


@pytest.mark.parametrize("labels", [True, False], ids=["labels", "label_free"])
def test_each_phase_runs_and_changes_the_right_networks(tmp_path, labels):
    loader = None if labels else [(images, None) for images, _ in labeled_batches()]
    trainer, result, watch = run_all_phases(tmp_path, labels, loader)
    assert trainer.method.needs.labels is labels
    teacher_parameters = {n for n, _ in watch.teacher.named_parameters()}
    statistics = {n for n in watch.epochs[0][2] if n.endswith(("running_mean", "running_var"))}
    student_weights = {n for n, _ in watch.student.named_parameters() if "quantizer" not in n}
    # self-studying: the student moves; the teacher (parameters and batch-norm statistics) does
    # not; with labels it is never run, without labels it runs frozen (eval, no autograd)
    assert changed(watch.epochs[0][1], watch.epochs[1][1], student_weights) == student_weights
    assert not changed(watch.epochs[0][2], watch.epochs[1][2])
    assert watch.forwards(0) == ([] if labels else [(False, False)] * 3)
    # co-studying: one train-mode forward with autograd per batch; both networks move
    assert watch.forwards(1) + watch.forwards(2) == [(True, True)] * 6
    assert changed(watch.epochs[1][2], watch.epochs[3][2], teacher_parameters) == teacher_parameters
    assert changed(watch.epochs[1][2], watch.epochs[2][2], statistics) == statistics
    assert changed(watch.epochs[1][1], watch.epochs[3][1], student_weights) == student_weights
    # tutoring: the teacher runs frozen and nothing of it changes; the student still learns
    assert watch.forwards(3) == [(False, False)] * 3
    assert not changed(watch.epochs[3][2], watch.epochs[4][2])
    assert changed(watch.epochs[3][1], watch.epochs[4][1], student_weights) == student_weights
    assert [row["phase"] for row in result.history] == [
        "self_studying", "co_studying", "co_studying", "tutoring",
    ]  # fmt: skip
    terms = [
        {k for k in row if k.startswith("train_") and k != "train_loss"} for row in result.history
    ]
    if labels:
        assert terms == [
            {"train_ce"}, *[{"train_ce", "train_kl", "train_teacher_ce", "train_teacher_kl"}] * 2,
            {"train_ce", "train_kl"},
        ]  # fmt: skip
    else:
        assert terms == [{"train_kl"}, *[{"train_kl", "train_teacher_kl"}] * 2, {"train_kl"}]
    # the teacher's optimizer: its schedule spans co-studying only (2 epochs x 3 batches)
    assert trainer.schedulers["teacher"].last_epoch == 6
    assert trainer.schedulers["weights"].last_epoch == 12


def test_the_teacher_optimizer_defaults_to_a_tenth_of_the_students_learning_rate(tmp_path):
    student, teacher = student_and_teacher()
    weights = OptimizerConfig(name="sgd", lr=0.05, momentum=0.8, weight_decay=1e-4)
    trainer = make_trainer(qkd(), student, teacher, labeled_batches(), tmp_path, 4, weights=weights)
    optimizer = trainer.optimizers["teacher"]
    assert isinstance(optimizer, torch.optim.SGD)
    group = optimizer.param_groups[0]
    assert group["initial_lr"] == pytest.approx(0.005)
    assert (group["momentum"], group["weight_decay"]) == (0.8, 1e-4)
    scaled = make_trainer(qkd(teacher_lr_scale=0.5), student, teacher, labeled_batches(),
                          tmp_path / "b", 4, weights=weights)  # fmt: skip
    assert scaled.optimizers["teacher"].param_groups[0]["initial_lr"] == pytest.approx(0.025)
    chosen = OptimizerConfig(name="adam", lr=1e-6)
    overridden = make_trainer(qkd(), student, teacher, labeled_batches(), tmp_path / "c", 4,
                              weights=weights, optimizers={"teacher": chosen})  # fmt: skip
    assert isinstance(overridden.optimizers["teacher"], torch.optim.Adam)
    assert overridden.optimizers["teacher"].param_groups[0]["initial_lr"] == 1e-6


# ------------------------------------------------------------------- co-studying gradients
def test_co_studying_gives_each_network_exactly_the_gradient_of_its_own_loss():
    student, teacher = student_and_teacher()
    assert teacher.training
    images, labels = labeled_batches(1)[0]
    method = qkd(temperature=3.0, teacher_ce_weight=0.4, teacher_kl_weight=2.5)
    losses = method.losses(
        Models(student, teacher), Batch(images, labels, size=6), Phase("co_studying", 1)
    )
    assert set(losses) == {"ce", "kl", "teacher_ce", "teacher_kl"}
    teacher_params = list(teacher.parameters())
    student_params = [p for p in student.parameters() if p.requires_grad]
    # the student's terms send nothing into the teacher, the teacher's nothing into the student
    student_terms = losses["ce"] + losses["kl"]
    teacher_terms = losses["teacher_ce"] + losses["teacher_kl"]
    none = torch.autograd.grad(student_terms, teacher_params, retain_graph=True, allow_unused=True)
    assert all(g is None for g in none)
    none = torch.autograd.grad(teacher_terms, student_params, retain_graph=True, allow_unused=True)
    assert all(g is None for g in none)
    total = sum(losses.values())
    from_total = torch.autograd.grad(total, teacher_params + student_params)
    # by hand, from fresh forwards (train-mode batch norm: batch statistics, same outputs)
    teacher_logits = teacher(images)
    student_logits = student(images)
    log_p_student = F.log_softmax(student_logits.detach() / 3.0, dim=1)
    log_p_teacher = F.log_softmax(teacher_logits / 3.0, dim=1)
    teacher_kl = (log_p_student.exp() * (log_p_student - log_p_teacher)).sum(1).mean() * 9.0
    teacher_loss = 0.4 * F.cross_entropy(teacher_logits, labels) + 2.5 * teacher_kl
    by_hand = torch.autograd.grad(teacher_loss, teacher_params)
    for got, expected in zip(from_total[: len(teacher_params)], by_hand, strict=True):
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-7)
    student_loss = F.cross_entropy(student_logits, labels) + kd_kl_divergence(
        student_logits, teacher_logits.detach(), 3.0
    )
    by_hand = torch.autograd.grad(student_loss, student_params)
    for got, expected in zip(from_total[len(teacher_params) :], by_hand, strict=True):
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-7)


# -------------------------------------------------------------------------- loss values
WEIGHTS = dict(temperature=3.0, student_ce_weight=0.7, student_kl_weight=1.3,
               teacher_ce_weight=0.4, teacher_kl_weight=2.5)  # fmt: skip


@pytest.mark.parametrize("labels", [True, False], ids=["labels", "label_free"])
def test_each_named_loss_is_its_formula(labels):
    student, teacher = student_and_teacher()
    images, y = labeled_batches(1)[0]
    method = qkd(labels=labels, **WEIGHTS)
    batch = Batch(images, y if labels else None, size=6)
    models = Models(student, teacher)
    start = snapshot(teacher)  # a train-mode forward moves its statistics: start each from here
    with torch.no_grad():
        s = student(images)
        t_train = teacher.train()(images)
        teacher.load_state_dict(start)
        t_eval = teacher.eval()(images)

    def kl(a, b):  # T^2 KL(softmax(b / T) || softmax(a / T))
        return kd_kl_divergence(a, b, 3.0)

    def computed(phase: str, teacher_mode: bool) -> dict[str, float]:
        teacher.load_state_dict(start)
        teacher.train(teacher_mode)
        with torch.no_grad():
            return {k: float(v) for k, v in method.losses(models, batch, Phase(phase, 1)).items()}

    ce = 0.7 * F.cross_entropy(s, y)
    if labels:
        expected = {
            "self_studying": {"ce": ce},
            "co_studying": {"ce": ce, "kl": 1.3 * kl(s, t_train),
                            "teacher_ce": 0.4 * F.cross_entropy(t_train, y),
                            "teacher_kl": 2.5 * kl(t_train, s)},
            "tutoring": {"ce": ce, "kl": 1.3 * kl(s, t_eval)},
        }  # fmt: skip
    else:
        expected = {
            "self_studying": {"kl": 1.3 * kl(s, t_eval)},
            "co_studying": {"kl": 1.3 * kl(s, t_train), "teacher_kl": 2.5 * kl(t_train, s)},
            "tutoring": {"kl": 1.3 * kl(s, t_eval)},
        }
    for phase, terms in expected.items():
        got = computed(phase, teacher_mode=phase == "co_studying")
        assert set(got) == set(terms), phase
        for name, value in terms.items():
            assert got[name] == pytest.approx(float(value), rel=1e-6), (phase, name)


# --------------------------------------------------------------------------- phase plans
def plan(method: QKD, epochs: int) -> list[tuple[str, int]]:
    return [(phase.name, phase.epochs) for phase in method.phases(epochs)]


def test_phase_boundaries_from_fractions_and_from_epochs():
    assert plan(qkd(), 200) == [("self_studying", 30), ("co_studying", 100), ("tutoring", 70)]
    assert plan(qkd(), 10) == [("self_studying", 2), ("co_studying", 5), ("tutoring", 3)]
    assert plan(qkd(self_study_epochs=3, co_study_epochs=4), 10) == [
        ("self_studying", 3), ("co_studying", 4), ("tutoring", 3),
    ]  # fmt: skip
    assert plan(qkd(self_study_epochs=30, co_study_epochs=0.5), 200) == [
        ("self_studying", 30), ("co_studying", 100), ("tutoring", 70),
    ]  # fmt: skip
    # a phase of 0 epochs is left out
    assert plan(qkd(self_study_epochs=0, co_study_epochs=1.0), 5) == [("co_studying", 5)]
    assert plan(qkd(self_study_epochs=1, co_study_epochs=2), 3) == [
        ("self_studying", 1), ("co_studying", 2),
    ]  # fmt: skip
    phases = qkd(self_study_epochs=1, co_study_epochs=2).phases(4)
    assert [phase_at(phases, e).name for e in range(4)] == [
        "self_studying", "co_studying", "co_studying", "tutoring",
    ]  # fmt: skip
    co_studying = phases[1]
    assert co_studying.trains == ("weights", "quantizers", "teacher")
    assert phases[0].trains == phases[2].trains == ("weights", "quantizers")


# -------------------------------------------------------------------------------- resume
def resumable_trainer(tmp_path: Path, checkpoint_every_steps=None):
    student, teacher = student_and_teacher()
    method = qkd(self_study_epochs=1, co_study_epochs=2)
    trainer = make_trainer(method, student, teacher, labeled_batches(), tmp_path, 4,
                           checkpoint_every_steps=checkpoint_every_steps)  # fmt: skip
    return trainer, student, teacher


def test_a_resume_in_the_middle_of_co_studying_is_bit_identical(tmp_path, fit_until):
    full, full_student, full_teacher = resumable_trainer(tmp_path / "full")
    full.fit()
    cut, _, _ = resumable_trainer(tmp_path / "cut", checkpoint_every_steps=2)
    fit_until(cut, 5)  # epoch 2 (co-studying), batch 3: the checkpoint of step 4 is kept
    state = safe_torch_load(tmp_path / "cut" / "checkpoints" / "last.pt")
    assert (state["epoch"], state["batch_in_epoch"]) == (1, 1) and "teacher" in state
    resumed, student, teacher = resumable_trainer(tmp_path / "resumed")
    resumed.resume(tmp_path / "cut" / "checkpoints" / "last.pt")
    assert resumed.phase.name == "co_studying"
    result = resumed.fit()
    for mine, theirs in ((student, full_student), (teacher, full_teacher)):
        for key, value in theirs.state_dict().items():
            assert torch.equal(mine.state_dict()[key], value), key
    for name in ("teacher", "weights", "quantizers"):
        mine, theirs = resumed.optimizers[name].state_dict(), full.optimizers[name].state_dict()
        assert mine["param_groups"] == theirs["param_groups"], name
        assert mine["state"].keys() == theirs["state"].keys(), name
        for index, values in theirs["state"].items():
            for key, value in values.items():
                assert torch.equal(torch.as_tensor(mine["state"][index][key]),
                                   torch.as_tensor(value)), (name, index, key)  # fmt: skip
    assert [(r["phase"], r["train_loss"]) for r in result.history] == [
        (r["phase"], r["train_loss"]) for r in full.result.history
    ]


# ------------------------------------------------------------------------ reading no label
class LabelsForbidden:
    """A loader whose batches carry labels that raise when anything reads them."""

    class Forbidden:
        def __getattr__(self, name):
            raise AssertionError(f"a label was read ({name})")

        def __getitem__(self, index):
            raise AssertionError("a label was read")

    def __init__(self, batches):
        self.batches = batches

    def __iter__(self):
        return ((images, None) for images, _ in self.batches)

    def __len__(self):
        return len(self.batches)


def test_the_label_free_variant_reads_no_label_and_the_labeled_one_refuses_none(tmp_path):
    method = build_method(load_config(None, ["method.name=qkd", "method.labels=false"]).method)
    assert method.needs.labels is False and method.needs.teacher == "trainable"
    assert build_method(load_config(None, ["method.name=qkd"]).method).needs.labels is True
    trainer, result, _ = run_all_phases(tmp_path, False, LabelsForbidden(labeled_batches()))
    assert len(result.history) == 4
    # a batch whose labels raise on any access: the label-free losses never touch them
    student, teacher = student_and_teacher()
    images = labeled_batches(1)[0][0]
    batch = Batch(images, LabelsForbidden.Forbidden(), size=6)  # type: ignore[arg-type]
    for phase in ("self_studying", "co_studying", "tutoring"):
        method.losses(Models(student, teacher), batch, Phase(phase, 1))
    with pytest.raises(ValueError, match="QKD with labels true got a batch without labels"):
        qkd().losses(Models(student, teacher), Batch(images, None, size=6), Phase("tutoring", 1))


# ----------------------------------------------------------------------------- bad input
def one_line(error: pytest.ExceptionInfo) -> str:
    assert "\n" not in str(error.value)
    return str(error.value)


def test_phase_epochs_that_do_not_fit_are_one_line_errors(tmp_path):
    student, teacher = student_and_teacher()
    with pytest.raises(
        ValueError, match=r"self_study_epochs 3 \+ co_study_epochs 9 exceed train.epochs 10 by 2"
    ) as error:
        make_trainer(qkd(self_study_epochs=3, co_study_epochs=9), student, teacher,
                     labeled_batches(), tmp_path, 10)  # fmt: skip
    one_line(error)
    with pytest.raises(
        ValueError,
        match=r"self_study_epochs 0.5 \(5 epochs\) \+ co_study_epochs 6 exceed train.epochs 10 by 1",
    ) as error:
        qkd(self_study_epochs=0.5, co_study_epochs=6).phases(10)
    one_line(error)
    with pytest.raises(ValueError, match="leaves no co-studying") as error:
        qkd(co_study_epochs=0.1).phases(4)
    one_line(error)
    for settings, message in (
        (["method.self_study_epochs=0.6", "method.co_study_epochs=0.5"], "exceed the whole run"),
        (["method.co_study_epochs=1.5"], "neither whole epochs nor a fraction"),
        (["method.self_study_epochs=-2"], "negative"),
        (["method.labels=false", "method.teacher_kl_weight=0"], "teacher_kl_weight must be > 0"),
        (["method.student_ce_weight=0"], "self-studying is cross-entropy only"),
        (["method.temprature=2"], "did you mean 'method.temperature'"),
    ):
        with pytest.raises(ValueError, match=message) as error:
            load_config(None, ["method.name=qkd", *settings])
        one_line(error)


def test_a_teacher_that_cannot_train_is_a_one_line_error(tmp_path):
    student, _ = student_and_teacher()
    frozen = network().requires_grad_(False)
    with pytest.raises(ValueError, match="none of its parameters requires gradients") as error:
        make_trainer(qkd(), student, frozen, labeled_batches(), tmp_path, 4)
    one_line(error)
    with pytest.raises(ValueError, match="none of its parameters requires gradients"):
        qkd().setup(Models(student, frozen), None)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="role is 'trainable' but no teacher was given"):
        make_trainer(qkd(), student, None, labeled_batches(), tmp_path, 4)
