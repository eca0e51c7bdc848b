"""run.precision: bf16 runs the step under torch.autocast (teacher and student forwards in
bfloat16; quantizers, losses, gradients and weights in float32), resumes exactly, and is stated
in the run log; fp16 is refused off CUDA, and a model cast to bfloat16 is refused by prepare and
calibrate with one line naming the fix."""

from __future__ import annotations

import copy
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from sqakd import pipeline
from sqakd.config import MethodConfig, TrainConfig, load_config
from sqakd.data.decode import decode_image
from sqakd.data.files import list_images
from sqakd.engine import RunLog, Trainer, safe_torch_load, teacher_for
from sqakd.engine.precision import autocast, check_precision
from sqakd.methods import build_method
from sqakd.models import build_model, load_weights
from sqakd.quant import QuantPolicy, calibrate, prepare

WORK = Path(__file__).resolve().parents[3]
TEACHER = WORK / "shared" / "teachers" / "resnet20-cifar10jpeg-e30.safetensors"
#: the normalisation the shared teacher was trained with (shared/teachers/README.md)
MEAN = (0.49125038411458327, 0.482090271216299, 0.4465209360447303)
STD = (0.24523160744670275, 0.24278155024374343, 0.26062876810583296)
#: bf16 teacher logits may differ from float32 ones by this fraction of the image's largest
#: |logit| (measured: at most 2.9 % with batch norm folded, 3.0 % unfolded, over 500 images)
LOGIT_TOLERANCE = 0.05
#: the share of images whose bf16 top-1 class must be the float32 one (measured: 100 % folded,
#: 99.8 % unfolded, over 500 images)
TOP1_AGREEMENT = 0.98


def cifar10_test_images(per_class: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``per_class`` real test JPEGs of every class, normalised as the shared teacher expects."""
    given = os.environ.get("SQAKD_CIFAR10_ROOT")
    root = Path(given) if given else WORK / "data" / "cifar10"
    if not (root / "test").is_dir():
        pytest.skip(f"real CIFAR-10 JPEGs not found at {root} (set SQAKD_CIFAR10_ROOT)")
    classes = sorted(p.name for p in (root / "test").iterdir() if p.is_dir())
    paths, labels = [], []
    for label, name in enumerate(classes):
        found = list_images(root / "test" / name)[:per_class]
        paths += [str(root / "test" / name / path) for path in found]  # absolute stays absolute
        labels += [label] * len(found)
    pixels = torch.from_numpy(np.stack([decode_image(path) for path in paths]))
    images = pixels.permute(0, 3, 1, 2).float() / 255
    mean, std = torch.tensor(MEAN).view(1, 3, 1, 1), torch.tensor(STD).view(1, 3, 1, 1)
    return (images - mean) / std, torch.tensor(labels)


@pytest.mark.parametrize("role", ["logits", "features"])  # batch norm folded, and not
def test_bf16_teacher_logits_on_real_images_are_close_to_float32(role):
    if not TEACHER.is_file():
        pytest.skip(f"the shared teacher {TEACHER} is not here")
    images, labels = cifar10_test_images(per_class=50)
    teacher = load_weights(build_model("resnet20", num_classes=10), TEACHER)
    frozen = teacher_for(role, teacher)
    with torch.inference_mode():
        expected = frozen(images)
        with autocast("bf16", "cpu"):
            logits = frozen(images)
    assert logits.dtype == torch.bfloat16
    gap = (logits.float() - expected).abs().amax(dim=1)
    scale = expected.abs().amax(dim=1)
    assert (gap <= LOGIT_TOLERANCE * scale).all(), float((gap / scale).max())
    agreement = (logits.argmax(1) == expected.argmax(1)).float().mean()
    assert agreement >= TOP1_AGREEMENT
    assert (expected.argmax(1) == labels).float().mean() > 0.8  # a trained teacher, right data


def tiny_trainer(tmp_path: Path, precision: str, checkpoint_every_steps: int | None = None):
    """SQAKD on a small quantized conv net (batch norm, LSQ W4A4) over 3 batches of 8x8 images,
    2 epochs, with the trainer's checkpoints in ``tmp_path``."""
    torch.manual_seed(0)
    teacher = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 3),
                            nn.ReLU(), nn.Flatten(), nn.Linear(8 * 4 * 4, 3)).eval()  # fmt: skip
    student = prepare(copy.deepcopy(teacher), QuantPolicy(method="lsq", first_last="same")).train()
    generator = torch.Generator().manual_seed(1)
    batches = [(torch.randn(6, 3, 8, 8, generator=generator), None) for _ in range(3)]
    calibrate(student, [batches[0][0]])
    config = TrainConfig(epochs=2, checkpoint_every_steps=checkpoint_every_steps)
    return Trainer(student, teacher_for("logits", teacher), build_method(MethodConfig(name="sqakd")),
                   batches, config, torch.device("cpu"), RunLog(tmp_path, enabled=False),
                   checkpoint_dir=tmp_path / "checkpoints", progress=False,
                   precision=precision)  # fmt: skip


def test_a_bf16_run_resumes_bit_exactly_like_a_float32_run(tmp_path, fit_until):
    full = tiny_trainer(tmp_path / "full", "bf16")
    full.fit()
    cut = tiny_trainer(tmp_path / "cut", "bf16", checkpoint_every_steps=2)
    fit_until(cut, 4)  # mid-epoch: epoch 2, batch 1
    state = safe_torch_load(tmp_path / "cut" / "checkpoints" / "last.pt")
    assert (state["epoch"], state["batch_in_epoch"]) == (1, 1)
    assert all(t.dtype == torch.float32 for t in state["student"].values() if t.is_floating_point())
    resumed = tiny_trainer(tmp_path / "resumed", "bf16")
    resumed.resume(tmp_path / "cut" / "checkpoints" / "last.pt")
    resumed.fit()
    for name, value in full.student.state_dict().items():
        torch.testing.assert_close(resumed.student.state_dict()[name], value, rtol=0, atol=0)
    losses = [row["train_loss"] for row in full.result.history]
    assert [row["train_loss"] for row in resumed.result.history] == losses
    # autocast did act: float32 training ends elsewhere, though not far
    plain = tiny_trainer(tmp_path / "float32", "float32")
    plain.fit()
    weights = [(name, w) for name, w in plain.student.state_dict().items() if "weight" in name]
    assert any(not torch.equal(w, full.student.state_dict()[name]) for name, w in weights)
    for name, value in weights:
        torch.testing.assert_close(full.student.state_dict()[name], value, rtol=0.05, atol=0.01)


def test_fp16_is_refused_off_cuda_with_one_line():
    with pytest.raises(ValueError, match="run.precision: bf16") as refused:
        check_precision("fp16", "cpu")
    assert "\n" not in str(refused.value) and "CUDA" in str(refused.value)
    with pytest.raises(ValueError, match="fp16 needs a CUDA device"):
        load_config(None, ["run.precision=fp16"])
    with pytest.raises(ValueError, match="fp16 needs a CUDA device"):
        tiny_trainer(Path("unused"), "fp16")
    check_precision("bf16", "cpu")  # accepted


def test_a_bfloat16_model_is_refused_by_prepare_and_calibrate_with_the_fix():
    model = build_model("resnet20", num_classes=10)
    policy = QuantPolicy(method="ewgs", weight_bits=4, act_bits=4, first_last="same")
    with pytest.raises(ValueError, match="keep the model and its inputs float32") as refused:
        prepare(copy.deepcopy(model).to(torch.bfloat16), policy)
    message = str(refused.value)
    assert "\n" not in message and "conv1.weight" in message and "run.precision: bf16" in message
    prepared = prepare(model, policy)
    images = torch.randn(4, 3, 32, 32)
    with pytest.raises(ValueError, match="sqakd.calibrate: the model's parameter"):
        calibrate(copy.deepcopy(prepared).to(torch.bfloat16), [images.bfloat16()])
    with pytest.raises(ValueError, match="is torch.bfloat16"):  # float32 model, bf16 input
        calibrate(copy.deepcopy(prepared), [images.bfloat16()])
    with autocast("bf16", "cpu"):  # what works: a float32 model under autocast
        calibrate(prepared, [images])
        assert prepared.train()(images).dtype == torch.bfloat16


def test_the_run_log_states_the_precision(tmp_path, image_tree, teacher_weights):
    settings = [
        f"data.root={image_tree}", "data.batch_size=8", "data.eval_batch_size=6",
        "model.name=small_cnn", "model.kwargs={width: 8}", f"teacher.checkpoint={teacher_weights}",
        "train.epochs=1", "run.progress=false", "run.compile=false", "run.precision=bf16",
        f"run.output={tmp_path / 'run'}", "quant.method=ewgs", "quant.first_last=float",
    ]  # fmt: skip
    result = pipeline.run(load_config(None, settings))
    assert "top1" in result.last
    log = (tmp_path / "run" / "train.log").read_text()
    assert "precision bf16 (torch.autocast" in log
    assert "precision: bf16" in (tmp_path / "run" / "config.yaml").read_text()
