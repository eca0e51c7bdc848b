"""The method contract, exercised by small methods written here, without touching the engine or
the pipeline: (a) phases, each updating exactly the groups it names, with a trainable teacher and
an exact mid-phase resume; (b) a data-free method with two updates per batch (a toy generator,
then the student) that never reads a training image; (c) a feature method with its own adapter,
taps on a features-role teacher and on a DDP-wrapped student. Plus the one-line errors."""

from __future__ import annotations

import copy
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from sqakd import data as datasets
from sqakd import pipeline
from sqakd.config import MethodConfig, TrainConfig, load_config
from sqakd.distill import FeatureTaps, kd_kl_divergence
from sqakd.engine import RunLog, Trainer, safe_torch_load, teacher_for
from sqakd.methods import (
    Batch,
    DataShapes,
    Method,
    Models,
    Needs,
    Phase,
    build_method,
    register_method,
    student_groups,
)
from sqakd.quant import QuantPolicy, calibrate, model_parameters, prepare, quantizer_parameters


# ------------------------------------------------------------------------------ the methods
@register_method("test_two_phase")
class TwoPhase(Method):
    """Phase 1 trains the student alone; phase 2 trains the student and the teacher together
    (each learning from the other's detached logits, as QKD's co-studying)."""

    needs = Needs(labels=True, teacher="trainable")

    def phases(self, epochs: int) -> list[Phase]:
        return [
            Phase("alone", 1, trains=("weights", "quantizers")),
            Phase("together", epochs - 1, trains=("weights", "quantizers", "teacher")),
        ]

    def losses(self, models: Models, batch: Batch, phase: Phase) -> dict[str, torch.Tensor]:
        logits = models.student(batch.images)
        losses = {"ce": F.cross_entropy(logits, batch.labels)}
        if phase.name == "together":
            teacher_logits = models.teacher(batch.images)
            losses["teacher_ce"] = F.cross_entropy(teacher_logits, batch.labels)
            losses["kl"] = kd_kl_divergence(logits, teacher_logits.detach(), 2.0)
            losses["teacher_kl"] = kd_kl_divergence(teacher_logits, logits.detach(), 2.0)
        return losses


@register_method("test_data_free")
class DataFree(Method):
    """A toy generator makes the images; it is updated to make student and teacher disagree,
    then the student is updated to agree with the teacher on the generated images."""

    needs = Needs(teacher="features", data="none")

    def setup(self, models: Models, shapes: DataShapes) -> None:
        self.shape = shapes.image_shape
        self.generator = nn.Sequential(nn.Linear(4, math.prod(self.shape)), nn.Tanh())

    def generate(self, size: int) -> torch.Tensor:
        latent = torch.randn(size, 4, device=self.generator[0].weight.device)
        return self.generator(latent).view(size, *self.shape)

    def parameter_groups(self, models: Models) -> dict[str, list[nn.Parameter]]:
        return {**student_groups(models.student), "generator": list(self.generator.parameters())}

    def calibration_images(self, batches):
        for batch in batches:
            yield self.generate(batch.size).detach()

    def training_step(self, models, batch, step):
        assert batch.images is None and batch.labels is None and batch.size > 0
        images = self.generate(batch.size)
        disagreement = {
            "disagreement": -kd_kl_divergence(models.student(images), models.teacher(images))
        }
        step.update(disagreement, groups=("generator",))
        images = images.detach()
        with torch.no_grad():
            teacher_logits = models.teacher(images)
        agreement = {"kl": kd_kl_divergence(models.student(images), teacher_logits)}
        step.update(agreement, groups=("weights", "quantizers"))
        return {**disagreement, **agreement}


@register_method("test_feature_hint")
class FeatureHint(Method):
    """Logit KL plus a FitNet-style hint through a 1x1 adapter on one tapped layer."""

    needs = Needs(teacher="features")
    layer = "2"  # the first ReLU of the Sequential below

    def setup(self, models: Models, shapes: DataShapes) -> None:
        self.student_taps = FeatureTaps(models.student, [self.layer])
        self.teacher_taps = FeatureTaps(models.teacher, [self.layer])
        with torch.no_grad():
            _, features = self.teacher_taps(torch.zeros(1, *shapes.image_shape))
        channels = features[self.layer].shape[1]
        self.adapter = nn.Conv2d(channels, channels, 1)

    def losses(self, models, batch, phase):
        logits = models.student(batch.images)
        student_map = self.student_taps.features[self.layer]
        with torch.no_grad():
            teacher_logits, teacher_features = self.teacher_taps(batch.images)
        return {
            "kl": kd_kl_divergence(logits, teacher_logits),
            "hint": F.mse_loss(self.adapter(student_map), teacher_features[self.layer]),
        }


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


def student_and_teacher(role: str) -> tuple[nn.Module, nn.Module | None]:
    base = network()
    student = prepare(
        copy.deepcopy(base), QuantPolicy(method="lsq", weight_bits=4, act_bits=4)
    ).train()
    return student, teacher_for(role, base)


def make_trainer(method, student, teacher, loader, tmp_path, epochs, **train) -> Trainer:
    return Trainer(student, teacher, method, loader, TrainConfig(epochs=epochs, **train),
                   torch.device("cpu"), RunLog(tmp_path, enabled=False),
                   checkpoint_dir=tmp_path / "checkpoints", progress=False,
                   epoch_hooks=train.pop("hooks", ()))  # fmt: skip


def snapshot(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def changed(before: dict, after: dict, keys=None) -> set[str]:
    return {k for k in (keys or before) if not torch.equal(before[k], after[k])}


# --------------------------------------------------------------------- (a) phases, teacher
def two_phase_trainer(tmp_path: Path, checkpoint_every_steps=None):
    student, teacher = student_and_teacher("trainable")
    batches = labeled_batches()
    calibrate(student, [batches[0][0]])
    states = []

    def remember(epoch, model, loss, batches):  # an epoch hook: the models as each epoch starts
        states.append((epoch, snapshot(model), snapshot(teacher), teacher.training))

    trainer = Trainer(student, teacher, TwoPhase(), batches,
                      TrainConfig(epochs=3, checkpoint_every_steps=checkpoint_every_steps),
                      torch.device("cpu"), RunLog(tmp_path, enabled=False),
                      checkpoint_dir=tmp_path / "checkpoints", progress=False,
                      epoch_hooks=[remember])  # fmt: skip
    return trainer, student, teacher, states


def test_each_phase_updates_exactly_the_groups_it_names(tmp_path):
    trainer, student, teacher, states = two_phase_trainer(tmp_path)
    assert set(trainer.optimizers) == {"weights", "quantizers", "teacher"}
    result = trainer.fit()
    final = (3, snapshot(student), snapshot(teacher), teacher.training)
    (_, s0, t0, _), (_, s1, t1, _), (_, _, t2, _), (_, s3, t3, _) = [*states, final]
    weights = {n for n, p in student.named_parameters() if "quantizer" not in n}
    ranges = {n for n, p in student.named_parameters() if "quantizer" in n}
    assert ranges and weights
    # phase "alone": the student's weights and quantizer ranges move, the teacher not at all
    assert changed(s0, s1, weights) == weights and changed(s0, s1, ranges) == ranges
    assert not changed(t0, t1)  # parameters and batch-norm statistics: it never ran
    # phase "together": both move; the teacher ran in train mode (its statistics moved too)
    assert changed(s1, s3, weights) == weights
    teacher_parameters = {n for n, _ in teacher.named_parameters()}
    assert changed(t1, t3, teacher_parameters) == teacher_parameters
    assert changed(t1, t2, {n for n in t1 if n.endswith("running_mean")})
    assert [row["phase"] for row in result.history] == ["alone", "together", "together"]
    assert "train_teacher_ce" in result.history[1] and "train_teacher_ce" not in result.history[0]
    # each group's schedule spans only the steps that train it (the teacher's: 2 epochs x 3)
    assert trainer.schedulers["teacher"].last_epoch == 6
    assert trainer.schedulers["weights"].last_epoch == 9


def test_a_resume_in_the_middle_of_phase_two_is_bit_identical(tmp_path, fit_until):
    full, full_student, full_teacher, _ = two_phase_trainer(tmp_path / "full")
    full.fit()
    cut, _, _, _ = two_phase_trainer(tmp_path / "cut", checkpoint_every_steps=2)
    fit_until(cut, 5)  # epoch 2 (phase "together"), batch 3: the checkpoint of step 4 is kept
    state = safe_torch_load(tmp_path / "cut" / "checkpoints" / "last.pt")
    assert (state["epoch"], state["batch_in_epoch"]) == (1, 1) and "teacher" in state
    resumed, student, teacher, _ = two_phase_trainer(tmp_path / "resumed")
    resumed.resume(tmp_path / "cut" / "checkpoints" / "last.pt")
    assert resumed.phase.name == "together"
    result = resumed.fit()
    for mine, theirs in ((student, full_student), (teacher, full_teacher)):
        for key, value in theirs.state_dict().items():
            assert torch.equal(mine.state_dict()[key], value), key
    assert [r["train_loss"] for r in result.history] == [
        r["train_loss"] for r in full.result.history
    ]


# -------------------------------------------------------------- (b) data-free, two updates
def test_two_updates_per_batch_step_each_group_once_and_read_no_data(tmp_path):
    student, teacher = student_and_teacher("features")
    method = DataFree()
    method.setup(Models(student, teacher), DataShapes((3, 8, 8), 3))
    calibrate(student, method.calibration_images([Batch(None, size=6)]))
    before_student, before_teacher = snapshot(student), snapshot(teacher)
    before_generator = snapshot(method.generator)
    trainer = make_trainer(method, student, teacher, datasets.SizeOnlyBatches(6, 4), tmp_path, 2)
    assert set(trainer.optimizers) == {"weights", "quantizers", "generator"}
    result = trainer.fit()
    for name, optimizer in trainer.optimizers.items():  # one Adam step per batch for each group
        steps = {int(state["step"]) for state in optimizer.state.values()}
        assert steps == {8}, name
    assert changed(before_generator, snapshot(method.generator)) == set(before_generator)
    assert changed(before_student, snapshot(student))
    assert not changed(before_teacher, snapshot(teacher))
    assert {"train_disagreement", "train_kl"} <= set(result.history[-1])
    assert result.history[-1]["train_disagreement"] < 0


def test_a_data_free_run_never_touches_the_training_split(
    tmp_path, image_tree, teacher_weights, monkeypatch
):
    real_load = datasets.load_images

    def guarded(format, root, split, **options):
        if split == "train":
            raise AssertionError("a data-free method read the training split")
        return real_load(format, root, split=split, **options)

    monkeypatch.setattr(datasets, "load_images", guarded)
    settings = [
        f"data.root={image_tree}", "data.batch_size=4", "data.eval_batch_size=4",
        "model.name=small_cnn", "model.kwargs={width: 8}", "model.num_classes=2",
        f"teacher.checkpoint={teacher_weights}", "method.name=test_data_free",
        "train.epochs=1", "train.max_steps_per_epoch=2", "run.progress=false",
        f"run.output={tmp_path / 'run'}", "run.compile=false", "quant.first_last=float",
    ]  # fmt: skip
    result = pipeline.run(load_config(None, settings))
    assert result.labels_used is False and "top1" in result.last
    assert "data-free" in (tmp_path / "run" / "train.log").read_text()
    with pytest.raises(ValueError, match="set train.max_steps_per_epoch"):
        unbounded = [s for s in settings if not s.startswith(("train.max_steps", "run.output"))]
        pipeline.run(load_config(None, [*unbounded, f"run.output={tmp_path / 'again'}"]))


# ------------------------------------------------------------- (c) features and an adapter
def test_a_feature_method_trains_and_checkpoints_its_adapter(tmp_path):
    student, teacher = student_and_teacher("features")
    method = FeatureHint()
    method.setup(Models(student, teacher), DataShapes((3, 8, 8), 3))
    batches = [(images, None) for images, _ in labeled_batches()]
    calibrate(student, [batches[0][0]])
    adapter_before = snapshot(method.adapter)
    trainer = make_trainer(method, student, teacher, batches, tmp_path, 2)
    adapter_ids = {id(p) for p in method.adapter.parameters()}
    assert {
        id(p) for g in trainer.optimizers["adapters"].param_groups for p in g["params"]
    } == adapter_ids
    assert not adapter_ids & {
        id(p) for p in [*model_parameters(student), *quantizer_parameters(student)]
    }
    result = trainer.fit()
    assert changed(adapter_before, snapshot(method.adapter)) == set(adapter_before)
    assert result.history[-1]["train_hint"] > 0
    state = safe_torch_load(tmp_path / "checkpoints" / "last.pt")
    for key, value in method.adapter.state_dict().items():
        assert torch.equal(state["method"][f"adapter.{key}"], value)
    # a fresh method set up the same way gets the adapter back from the checkpoint
    fresh_student, fresh_teacher = student_and_teacher("features")
    fresh = FeatureHint()
    fresh.setup(Models(fresh_student, fresh_teacher), DataShapes((3, 8, 8), 3))
    calibrate(fresh_student, [batches[0][0]])
    make_trainer(fresh, fresh_student, fresh_teacher, batches, tmp_path / "b", 2).load_state_dict(
        state
    )
    assert not changed(snapshot(method.adapter), snapshot(fresh.adapter))


def test_taps_fire_on_the_features_teacher_and_a_ddp_wrapped_student(tmp_path):
    import torch.distributed as dist

    student, teacher = student_and_teacher("features")
    assert any(isinstance(m, nn.BatchNorm2d) for m in teacher.modules())  # not folded
    method = FeatureHint()
    method.setup(Models(student, teacher), DataShapes((3, 8, 8), 3))
    images = labeled_batches(1)[0][0]
    calibrate(student, [images])
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/store", rank=0, world_size=1)
    try:
        wrapped = nn.parallel.DistributedDataParallel(student)
        losses = method.losses(Models(wrapped, teacher), Batch(images, size=6), Phase("train", 1))
        assert method.student_taps.features["2"].shape == (6, 8, 8, 8)
        assert method.teacher_taps.features["2"].shape == (6, 8, 8, 8)
        sum(losses.values()).backward()
        assert method.adapter.weight.grad is not None
        assert all(p.grad is None for p in teacher.parameters())
    finally:
        dist.destroy_process_group()


# --------------------------------------------------------------------------- bad input
class Unbalanced(TwoPhase):
    def phases(self, epochs):
        return [Phase("alone", 1), Phase("together", 5)]


class UnknownGroup(TwoPhase):
    needs = Needs(labels=True, teacher="none")

    def phases(self, epochs):
        return [Phase("train", epochs, trains=("weights", "generator"))]


def test_bad_phase_plans_are_one_line_errors(tmp_path):
    student, teacher = student_and_teacher("trainable")
    loader = labeled_batches()
    with pytest.raises(
        ValueError, match=r"alone 1 \+ together 5 = 6 epochs but train.epochs is 3"
    ) as error:
        make_trainer(Unbalanced(), student, teacher, loader, tmp_path, 3)
    assert "\n" not in str(error.value)
    with pytest.raises(
        ValueError, match="trains group 'generator', which the method does not have"
    ) as error:
        make_trainer(UnknownGroup(), student, None, loader, tmp_path, 3)
    assert "\n" not in str(error.value)


def test_updating_a_group_the_phase_does_not_train_is_refused(tmp_path):
    class Greedy(TwoPhase):
        def training_step(self, models, batch, step):
            losses = self.losses(models, batch, step.phase)
            step.update(losses, groups=("teacher",))
            return losses

    student, teacher = student_and_teacher("trainable")
    trainer = make_trainer(Greedy(), student, teacher, labeled_batches(), tmp_path, 3)
    with pytest.raises(
        ValueError, match="update of group 'teacher', which phase 'alone' does not train"
    ):
        trainer.fit()


def test_a_frozen_role_teacher_must_be_prepared(tmp_path):
    student, _ = student_and_teacher("none")
    with pytest.raises(ValueError, match="teacher_for"):
        make_trainer(
            build_method(MethodConfig()), student, network(), labeled_batches(), tmp_path, 1
        )


def test_unknown_and_mistyped_method_options_name_the_key():
    with pytest.raises(
        ValueError,
        match="unknown config key 'method.temprature' for method 'sqakd'; did you mean 'method.temperature'",
    ):
        load_config(None, ["method.temprature=2"])
    with pytest.raises(
        ValueError, match="config key 'method.alpha': Input should be a valid number"
    ):
        load_config(None, ["method.alpha=lots"])
    with pytest.raises(ValueError, match="unknown config key 'method.alpha' for method 'qat'"):
        load_config(None, ["method.name=qat", "method.alpha=1"])
    recipe = load_config(None, ["method.alpha=0.5"]).method
    assert recipe.options["alpha"] == 0.5 and recipe.options["temperature"] == 4.0


def test_a_method_that_needs_sample_indices_gets_them_with_each_batch(tmp_path):
    import numpy as np

    from sqakd.data import ImageArray

    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (12, 4, 4, 3), dtype=np.uint8)
    bundle = pipeline.DataBundle(ImageArray(images, np.arange(12) % 3), None, None,
                                 (0.5,) * 3, (0.25,) * 3, 3, 3, (4, 4))  # fmt: skip
    config = load_config(None, ["data.batch_size=4", "data.augment.crop_padding=0",
                                "data.augment.flip=false"])  # fmt: skip
    loader, _, _ = pipeline.make_loaders(
        bundle, config, torch.device("cpu"), Needs(sample_index=True)
    )
    trainer = make_trainer(
        build_method(MethodConfig()), *student_and_teacher("logits"), [], tmp_path, 1
    )
    seen = []
    for item in loader:
        batch = trainer.to_batch(item)
        assert batch.labels is None and batch.index is not None and batch.size == 4
        expected = (
            torch.from_numpy(images[batch.index.numpy()]).permute(0, 3, 1, 2) / 255 - 0.5
        ) / 0.25
        torch.testing.assert_close(batch.images, expected)
        seen += batch.index.tolist()
    assert sorted(seen) == list(range(12))


def test_epoch_hooks_run_a_trainable_teacher_in_eval_mode(tmp_path):
    student, teacher = student_and_teacher("trainable")
    batches = labeled_batches()
    calibrate(student, [batches[0][0]])
    modes = []

    def measure(epoch, model, loss, batches):  # runs the method's loss, as EWGS's update does
        before = snapshot(teacher)
        modes.append(teacher.training)
        loss(model, next(batches))
        assert not changed(before, snapshot(teacher))  # batch-norm statistics unmoved

    trainer = Trainer(student, teacher, TwoPhase(), batches, TrainConfig(epochs=2),
                      torch.device("cpu"), RunLog(tmp_path, enabled=False), progress=False,
                      epoch_hooks=[measure])  # fmt: skip
    trainer.fit()
    assert modes == [False, False] and teacher.training  # back in train mode for co-training
