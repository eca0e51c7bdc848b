"""Teacher outputs computed once when training images repeat every epoch (no augmentation)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from sqakd.config import load_config
from sqakd.data import ImageArray
from sqakd.engine import RunLog
from sqakd.engine.teacher_cache import CachedTeacher
from sqakd.methods import Needs
from sqakd.pipeline import DataBundle, role_teacher


class Counting(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(4 * 6 * 6, 5)
        )
        self.images_seen = 0

    def forward(self, x):
        self.images_seen += x.shape[0]
        return self.net(x)


def test_cached_logits_equal_the_teachers_in_any_batch_order():
    torch.manual_seed(0)
    teacher = Counting().eval()
    images = torch.randn(12, 3, 8, 8)
    cached = CachedTeacher(teacher, [images[:5], images[5:]])
    assert teacher.images_seen == 12 and len(cached.table) == 12
    order = torch.randperm(12)[:7]
    with torch.no_grad():
        expected = teacher(images[order])
    teacher.images_seen = 0
    got = cached(images[order].contiguous(memory_format=torch.channels_last))  # layout-independent
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    assert teacher.images_seen == 0 and (cached.hits, cached.misses) == (7, 0)
    fresh = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(
            cached(torch.cat([images[:1], fresh])), teacher(torch.cat([images[:1], fresh]))
        )
    assert (
        cached.misses == 2 and len(cached.table) == 14
    )  # only the unseen images went to the teacher


def bundle() -> DataBundle:
    rng = np.random.default_rng(0)
    train = ImageArray(rng.integers(0, 256, (10, 8, 8, 3), dtype=np.uint8), np.arange(10) % 5)
    return DataBundle(train, None, None, (0.5,) * 3, (0.25,) * 3, 5, 3, (8, 8))


@pytest.mark.parametrize(
    ("settings", "cached"),
    [
        ([], False),  # default crop + flip: images change every epoch
        (["data.augment.crop_padding=0", "data.augment.flip=false"], True),
        (
            [
                "data.augment.crop_padding=0",
                "data.augment.flip=false",
                "teacher.cache_outputs=false",
            ],
            False,
        ),
    ],
)
def test_the_pipeline_caches_only_when_images_repeat(tmp_path, settings, cached):
    teacher = Counting().eval()
    result = role_teacher(teacher, Needs(), bundle(), load_config(None, settings),
                          torch.device("cpu"), RunLog(tmp_path, enabled=False))  # fmt: skip
    assert isinstance(result, CachedTeacher) is cached
    if cached:
        assert len(result.table) == 10


def test_forcing_the_cache_with_augmentation_is_refused(tmp_path):
    with pytest.raises(ValueError, match="data.augment.crop_padding=0"):
        role_teacher(Counting().eval(), Needs(), bundle(),
                     load_config(None, ["teacher.cache_outputs=true"]), torch.device("cpu"),
                     RunLog(tmp_path, enabled=False))  # fmt: skip


def test_only_a_logits_teacher_is_cached(tmp_path):
    settings = ["data.augment.crop_padding=0", "data.augment.flip=false"]
    for role in ("features", "trainable"):
        teacher = role_teacher(Counting().eval(), Needs(teacher=role), bundle(),
                               load_config(None, settings), torch.device("cpu"),
                               RunLog(tmp_path, enabled=False))  # fmt: skip
        assert not isinstance(teacher, CachedTeacher) and teacher.images_seen == 0
    with pytest.raises(ValueError, match="reads only the teacher's logits"):
        role_teacher(Counting().eval(), Needs(teacher="features"), bundle(),
                     load_config(None, [*settings, "teacher.cache_outputs=true"]),
                     torch.device("cpu"), RunLog(tmp_path, enabled=False))  # fmt: skip


def test_a_run_without_augmentation_trains_with_the_cached_teacher(
    image_tree, teacher_weights, tmp_path
):
    from sqakd.pipeline import quantize

    settings = [
        f"data.root={image_tree}", "data.batch_size=8", "data.eval_batch_size=4",
        "data.augment.crop_padding=0", "data.augment.flip=false", "model.name=small_cnn",
        "model.kwargs={width: 8}", f"teacher.checkpoint={teacher_weights}", "run.progress=false",
        "run.threads=1", "run.compile=false", "quant.method=lsq", "train.epochs=2",
        f"run.output={tmp_path / 'run'}",
    ]  # fmt: skip
    result = quantize(load_config(None, settings))
    assert "top1" in result.last
    assert (
        "teacher logits of 32 training images computed once"
        in (tmp_path / "run" / "train.log").read_text()
    )
