"""train.ewgs_delta_every_epochs: EWGS's Hessian-based delta update, an epoch hook the pipeline
attaches (the trainer knows no quantizer), runs at the start of the chosen epochs with the
method's own loss, and training sees the same batches as without it."""

from __future__ import annotations

import torch
from torch import nn

from sqakd.config import MethodConfig, TrainConfig, load_config
from sqakd.engine import RunLog, Trainer
from sqakd.methods import build_method
from sqakd.pipeline import quantizer_hooks
from sqakd.quant import QuantPolicy, calibrate, prepare, quantizers
from sqakd.quant.methods.ewgs import EWGSDeltaSchedule


class Recording:
    """A loader with set_epoch that remembers the first image of every batch it yields."""

    def __init__(self, batches):
        self.batches, self.seen, self.epoch = batches, [], 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        for images, labels in self.batches:
            self.seen.append((self.epoch, float(images[0, 0, 0, 0])))
            yield images, labels

    def __len__(self):
        return len(self.batches)


CALLS: list[int] = []


def calls_recorded(hook):
    def recorded(**arguments):
        CALLS.append(arguments["epoch"])
        return hook(**arguments)

    return recorded


def trainer_for(tmp_path, every):
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 3), nn.Flatten(), nn.Linear(8 * 4 * 4, 3)
    )
    student = prepare(
        net, QuantPolicy(method="ewgs", weight_bits=2, act_bits=2, first_last="float")
    )
    batches = [(torch.randn(6, 3, 8, 8), torch.randint(0, 3, (6,))) for _ in range(3)]
    calibrate(student, [batches[0][0]])
    loader = Recording(batches)
    config = TrainConfig(epochs=2)
    hooks = [calls_recorded(EWGSDeltaSchedule(every, batches=2))] if every else []
    trainer = Trainer(student, None, build_method(MethodConfig(name="qat")), loader, config,
                      torch.device("cpu"), RunLog(tmp_path, enabled=False), progress=False,
                      epoch_hooks=hooks)  # fmt: skip
    return trainer, student, loader


def test_deltas_are_updated_each_epoch_and_training_batches_are_unchanged(tmp_path):
    plain, plain_student, plain_loader = trainer_for(tmp_path / "a", None)
    plain.fit()
    updated, student, loader = trainer_for(tmp_path / "b", 1)
    CALLS.clear()
    updated.fit()
    assert CALLS == [0, 1]
    deltas = {name: float(q.delta) for name, q in quantizers(student)}
    assert len(deltas) == 2 and all(
        abs(d - 1e-3) > 1e-4 for d in deltas.values()
    )  # moved off the default
    assert all(abs(float(q.delta) - 1e-3) < 1e-9 for _, q in quantizers(plain_student))
    # 2 curvature batches + 3 training batches per epoch; the training ones are the plain run's
    training = [seen for index, seen in enumerate(loader.seen) if index % 5 >= 2]
    assert training == plain_loader.seen


def test_the_hook_runs_only_on_every_nth_epoch_and_the_pipeline_attaches_it():
    schedule = EWGSDeltaSchedule(every=2, batches=1)
    assert schedule(epoch=1, model=nn.Linear(1, 1), loss=None, batches=iter([])) == {}
    hooks = quantizer_hooks(load_config(None, ["train.ewgs_delta_every_epochs=3"]))
    assert len(hooks) == 1 and hooks[0].every == 3 and hooks[0].batches == 3
    assert quantizer_hooks(load_config(None, [])) == []
