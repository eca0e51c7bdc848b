"""feature_kd: the zoo's losses on the ResNet-20's taps, with labels (CE + the feature loss) or
label-free (KL + the feature loss); option errors; a short run lowers the loss and trains the
loss's own modules in the adapters group, never the teacher."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from sqakd.config import TrainConfig, load_config
from sqakd.distill import kd_kl_divergence
from sqakd.distill.attention import attention_transfer_loss
from sqakd.engine import RunLog, Trainer, safe_torch_load, teacher_for
from sqakd.methods import Batch, DataShapes, Models, Phase, build_method
from sqakd.models import build_model
from sqakd.quant import QuantPolicy, calibrate, prepare

SHAPES = DataShapes((3, 16, 16), 10, train_size=24, model_name="resnet20")


_TEACHER: list[nn.Module] = []


def networks() -> tuple[nn.Module, nn.Module]:
    """A ResNet-20 teacher with real batch-norm statistics (built once) and its LSQ student."""
    if not _TEACHER:
        torch.manual_seed(0)
        model = build_model("resnet20", num_classes=10).train()
        with torch.no_grad():
            model(torch.randn(32, 3, 16, 16))
        _TEACHER.append(model)
    teacher = copy.deepcopy(_TEACHER[0])
    student = prepare(copy.deepcopy(teacher), QuantPolicy(method="lsq", weight_bits=4, act_bits=4))
    return student.train(), teacher_for("features", teacher)


def feature_kd(*settings: str, student=None, teacher=None, shapes=SHAPES):
    method = build_method(load_config(None, ["method.name=feature_kd", *settings]).method)
    if student is None:
        student, teacher = networks()
    method.setup(Models(student, teacher), shapes)
    return method, student, teacher


def data(count: int = 3, size: int = 8):
    generator = torch.Generator().manual_seed(4)
    return [
        (torch.randn(size, 3, 16, 16, generator=generator),
         torch.randint(0, 10, (size,), generator=generator),
         torch.arange(i * size, (i + 1) * size))
        for i in range(count)
    ]  # fmt: skip


def test_options_name_the_registered_losses_and_the_released_weights():
    with pytest.raises(ValueError, match="unknown feature loss 'atx'; choose one of: at, cc"):
        load_config(None, ["method.name=feature_kd", "method.loss=atx"])
    assert build_method(load_config(None, ["method.name=feature_kd"]).method).weights == {
        "at": 1000
    }
    with pytest.raises(ValueError, match="loss_weight goes with method.loss"):
        load_config(
            None, ["method.name=feature_kd", "method.losses={at: 1}", "method.loss_weight=2"]
        )
    with pytest.raises(ValueError, match="'rkd' has no option 'angle'"):
        load_config(None, ["method.name=feature_kd", "method.loss=rkd",
                           "method.loss_options={rkd: {angle: 2}}"])  # fmt: skip
    method = build_method(load_config(None, ["method.name=feature_kd", "method.loss=at"]).method)
    assert method.weights == {"at": 1000.0} and method.label == "feature KD"
    assert method.needs.labels and method.needs.teacher == "features"
    several = build_method(
        load_config(
            None,
            ["method.name=feature_kd", "method.losses={sp: null, kd: 0.5}", "method.labels=false"],
        ).method  # fmt: skip
    )
    assert several.weights == {"sp": 3000.0, "kd": 0.5} and not several.needs.labels


@pytest.mark.parametrize("labels", [True, False])
def test_losses_are_ce_or_kl_plus_the_weighted_feature_loss(labels):
    method, student, teacher = feature_kd("method.loss=at", f"method.labels={labels}")
    images, targets, _ = data(1)[0]
    calibrate(student, [images])
    losses = method.losses(
        Models(student, teacher), Batch(images, targets, size=8), Phase("train", 1)
    )
    with torch.no_grad():
        logits, teacher_logits = student(images), teacher(images)
        s_maps, t_maps = [], []
        for model, maps in ((student, s_maps), (teacher, t_maps)):
            out = F.relu(model.bn1(model.conv1(images)))
            for stage in (model.layer1, model.layer2, model.layer3):
                out = stage(out)
                maps.append(out)
        expected_at = 1000 * sum(attention_transfer_loss(s, t) for s, t in zip(s_maps, t_maps))
    if labels:
        assert set(losses) == {"ce", "at"}
        torch.testing.assert_close(losses["ce"].detach(), F.cross_entropy(logits, targets))
    else:
        assert set(losses) == {"kd", "at"}
        torch.testing.assert_close(losses["kd"].detach(), kd_kl_divergence(logits, teacher_logits))
    torch.testing.assert_close(losses["at"].detach(), expected_at)


@pytest.mark.parametrize(
    ("loss", "keys"),
    [("at", ["layer1", "layer2", "layer3"]), ("nst", ["layer1", "layer2", "layer3"]),
     ("sp", ["layer3"]), ("rkd", ["fc:input"]), ("cc", ["fc:input"]), ("fitnet", ["layer2"]),
     ("vid", ["layer1", "layer2", "layer3"]), ("kd", ["logits"])],
)  # fmt: skip
def test_each_loss_reads_its_released_taps_and_gradients_skip_the_teacher(loss, keys):
    small = DataShapes((3, 8, 8), 10, train_size=24, model_name="resnet20")
    method, student, teacher = feature_kd(f"method.loss={loss}", shapes=small)
    assert method.keys[loss] == keys
    images, targets = torch.randn(4, 3, 8, 8), torch.tensor([0, 1, 2, 3])
    calibrate(student, [images])
    losses = method.losses(
        Models(student, teacher), Batch(images, targets, size=8), Phase("train", 1)
    )
    assert float(losses[loss].detach()) != 0
    losses[loss].backward()
    assert student.layer1[0].conv1.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in teacher.parameters())
    assert all(p.grad is not None for p in method.parameters())


def test_the_embedding_of_a_user_model_and_bad_taps():
    torch.manual_seed(0)
    base = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(4, 10))  # fmt: skip
    student = prepare(copy.deepcopy(base), QuantPolicy(method="lsq", weight_bits=4, act_bits=4))
    shapes = DataShapes((3, 8, 8), 10, model_name="mine.py:net")
    method, _, _ = feature_kd("method.loss=rkd", student=student, teacher=teacher_for("features", base),
                              shapes=shapes)  # fmt: skip
    assert method.keys["rkd"] == ["4:input"]
    with pytest.raises(ValueError, match="no layer 'layr2'.*did you mean 'layer2'") as error:
        feature_kd("method.loss=at", "method.layers=[layer1, layr2]")
    assert "\n" not in str(error.value)
    with pytest.raises(ValueError, match="name the modules to tap"):
        feature_kd("method.loss=at", student=student, teacher=teacher_for("features", base),
                   shapes=shapes)  # fmt: skip


def trainer(tmp_path, method, student, teacher, batches, epochs=2, every=None) -> Trainer:
    return Trainer(student, teacher, method, batches,
                   TrainConfig(epochs=epochs, checkpoint_every_steps=every,
                               weights={"name": "sgd", "lr": 0.02}),
                   torch.device("cpu"), RunLog(tmp_path, enabled=False),
                   checkpoint_dir=tmp_path / "checkpoints", progress=False)  # fmt: skip


def test_a_short_run_lowers_the_loss_and_trains_the_adapters_not_the_teacher(tmp_path):
    method, student, teacher = staged("method.loss=fitnet", "method.labels=false")
    assert method.keys["fitnet"] == ["5"]  # the middle of the two named layers
    batches = data()
    calibrate(student, [batches[0][0]])
    teacher_before = copy.deepcopy(teacher.state_dict())
    adapters_before = copy.deepcopy(method.feature_losses.state_dict())
    run = trainer(tmp_path, method, student, teacher, batches, epochs=4)
    assert {id(p) for g in run.optimizers["adapters"].param_groups for p in g["params"]} == {
        id(p) for p in method.parameters()
    }
    history = run.fit().history
    assert history[-1]["train_loss"] < history[0]["train_loss"]
    after = method.feature_losses.state_dict()
    assert any(not torch.equal(v, after[k]) for k, v in adapters_before.items())
    assert all(torch.equal(v, teacher.state_dict()[k]) for k, v in teacher_before.items())


# --------------------------------------------------------------------------------------- CRD
def tiny(seed: int = 0) -> tuple[nn.Module, nn.Module]:
    torch.manual_seed(seed)
    base = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 10))  # fmt: skip
    student = prepare(copy.deepcopy(base), QuantPolicy(method="lsq", weight_bits=4, act_bits=4))
    return student.train(), teacher_for("features", base)


TINY = DataShapes((3, 16, 16), 10, train_size=24, model_name="mine.py:net")


def test_crd_needs_indices_and_labels_only_when_class_aware():
    method = build_method(load_config(None, ["method.name=feature_kd", "method.loss=crd"]).method)
    assert method.needs.sample_index and method.needs.labels
    free = build_method(
        load_config(
            None, ["method.name=feature_kd", "method.loss=crd", "method.labels=false"]
        ).method
    )
    assert free.needs.sample_index and not free.needs.labels
    with pytest.raises(ValueError, match="reads labels.*crd.sampler: instance") as error:
        load_config(None, ["method.name=feature_kd", "method.loss=crd", "method.labels=false",
                           "method.loss_options={crd: {sampler: class}}"])  # fmt: skip
    assert "\n" not in str(error.value)


def test_a_resumed_crd_run_is_bit_identical_with_its_memory_bank_restored(tmp_path):
    def fresh(folder, every=None):
        student, teacher = tiny()
        method, _, _ = feature_kd("method.loss=crd", "method.loss_options={crd: {negatives: 64}}",
                                  student=student, teacher=teacher, shapes=TINY)  # fmt: skip
        batches = data()
        calibrate(student, [batches[0][0]])
        return trainer(folder, method, student, teacher, batches, every=every), method, student

    full, full_method, full_student = fresh(tmp_path / "full")
    full.fit()
    crd = full_method.feature_losses["crd"]
    assert int(crd.draws) == 6 and (crd.row_labels >= 0).all()
    cut, _, _ = fresh(tmp_path / "cut", every=2)
    original = cut.train_step

    def stop(batch):
        if cut.step == 4:
            raise KeyboardInterrupt
        return original(batch)

    cut.train_step = stop
    with pytest.raises(KeyboardInterrupt):
        cut.fit()
    state = safe_torch_load(tmp_path / "cut" / "checkpoints" / "last.pt")
    assert "feature_losses.crd.memory_student" in state["method"]
    resumed, method, student = fresh(tmp_path / "resumed")
    resumed.resume(tmp_path / "cut" / "checkpoints" / "last.pt")
    resumed.fit()
    for mine, theirs in ((student, full_student), (method, full_method)):
        for key, value in theirs.state_dict().items():
            assert torch.equal(mine.state_dict()[key], value), key


# ------------------------------------------------------------------------ FSP and FT stages
def two_stages(seed: int = 0) -> tuple[nn.Module, nn.Module]:
    torch.manual_seed(seed)
    base = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.Conv2d(8, 8, 3, stride=2, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 10))  # fmt: skip
    student = prepare(copy.deepcopy(base), QuantPolicy(method="lsq", weight_bits=4, act_bits=4))
    return student.train(), teacher_for("features", base)


def staged(*settings):
    student, teacher = two_stages()
    return feature_kd("method.layers=['2', '5']", *settings, student=student, teacher=teacher,
                      shapes=TINY)  # fmt: skip


def test_fsp_acts_only_in_its_pre_stage_and_the_plan_must_fit():
    method, student, teacher = staged("method.loss=fsp")
    assert method.keys["fsp"] == ["2:input", "2", "5"]
    assert method.phases(40) == [Phase("pre", 30, ("weights", "quantizers")), Phase("train", 10)]
    with pytest.raises(
        ValueError, match="'fsp' first runs a 30-epoch pre-stage but train.epochs is 30"
    ) as e:
        method.phases(30)
    assert "\n" not in str(e.value)
    images, targets, index = data(1)[0]
    calibrate(student, [images])
    batch = Batch(images, targets, index, 8)
    models = Models(student, teacher)
    pre = method.losses(models, batch, Phase("pre", 30))
    assert set(pre) == {"fsp"} and float(pre["fsp"].detach()) > 0
    assert set(method.losses(models, batch, Phase("train", 10))) == {"ce"}
    free, student, teacher = staged("method.loss=fsp", "method.labels=false")
    assert set(free.losses(Models(student, teacher), batch, Phase("train", 10))) == {"kd"}


def test_ft_trains_its_paraphraser_in_the_pre_stage_then_freezes_it(tmp_path):
    method, student, teacher = staged("method.loss=ft", "method.loss_options={ft: {pre_epochs: 1}}")
    assert method.phases(3) == [Phase("pre", 1, ("paraphraser",)),
                                Phase("train", 2, ("weights", "quantizers", "adapters"))]  # fmt: skip
    batches = data()
    calibrate(student, [batches[0][0]])
    ft = method.feature_losses["ft"]
    states = []

    def remember(epoch, model, loss, batches):
        states.append((copy.deepcopy(ft.paraphrasers.state_dict()),
                       copy.deepcopy(ft.translators.state_dict()), copy.deepcopy(model.state_dict())))  # fmt: skip

    run = Trainer(student, teacher, method, batches, TrainConfig(epochs=3),
                  torch.device("cpu"), RunLog(tmp_path, enabled=False), progress=False,
                  epoch_hooks=[remember])  # fmt: skip
    settings = run.optimizers["paraphraser"].defaults
    assert isinstance(run.optimizers["paraphraser"], torch.optim.SGD) and settings["lr"] == 0.01
    assert {id(p) for g in run.optimizers["adapters"].param_groups for p in g["params"]} == {
        id(p) for p in ft.translators.parameters()
    }
    history = run.fit().history
    assert [row["phase"] for row in history] == ["pre", "train", "train"]
    assert "train_ft_pre" in history[0] and "train_ft" in history[1] and "train_ce" in history[1]
    final = (ft.paraphrasers.state_dict(), ft.translators.state_dict(), student.state_dict())

    def same(a, b):
        return all(torch.equal(v, b[k]) for k, v in a.items())

    (p0, t0, s0), (p1, t1, s1), (p2, t2, s2) = states
    assert not same(p0, p1) and same(p1, p2) and same(p1, final[0])  # frozen after the pre-stage
    assert same(t0, t1) and not same(t1, final[1])  # the translator trains only afterwards
    weights = {k: v for k, v in s0.items() if "weight" in k}
    assert same(weights, s1) and not same(s1, final[2])  # the student waits for the main stage
