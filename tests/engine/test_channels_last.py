"""run.channels_last: the student and teacher train in NHWC layout and compute what the default
layout computes (up to float rounding)."""

from __future__ import annotations

import copy

import torch
from torch import nn

from sqakd.config import MethodConfig, TrainConfig
from sqakd.engine import RunLog, Trainer, teacher_for
from sqakd.methods import build_method
from sqakd.quant import QuantPolicy, calibrate, prepare


def run(tmp_path, channels_last: bool):
    torch.manual_seed(0)
    teacher = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 3),
                            nn.ReLU(), nn.Flatten(), nn.Linear(8 * 4 * 4, 3)).eval()  # fmt: skip
    student = prepare(copy.deepcopy(teacher), QuantPolicy(method="lsq", first_last="same")).train()
    batches = [(torch.randn(6, 3, 8, 8), None) for _ in range(3)]
    calibrate(student, [batches[0][0]])
    teacher = teacher_for("logits", teacher, channels_last=channels_last)
    trainer = Trainer(student, teacher, build_method(MethodConfig(name="sqakd")), batches,
                      TrainConfig(epochs=1), torch.device("cpu"), RunLog(tmp_path, enabled=False),
                      progress=False, channels_last=channels_last)  # fmt: skip
    losses = [trainer.train_step(trainer.to_batch(batch))["loss"] for batch in batches]
    return student, losses


def test_channels_last_trains_like_the_default_layout(tmp_path):
    plain, plain_losses = run(tmp_path / "a", False)
    nhwc, nhwc_losses = run(tmp_path / "b", True)
    assert nhwc[0].weight.is_contiguous(memory_format=torch.channels_last)
    assert not plain[0].weight.is_contiguous(memory_format=torch.channels_last)
    assert nhwc_losses[-1] < nhwc_losses[0]  # it trains
    for a, b in zip(plain_losses, nhwc_losses):
        assert abs(a - b) <= 1e-4 * max(abs(a), 1e-3)
    for (name, a), (_, b) in zip(plain.state_dict().items(), nhwc.state_dict().items()):
        torch.testing.assert_close(b, a, rtol=1e-3, atol=1e-5, msg=name)
