"""Under torchrun, the groups no DistributedDataParallel wrapper syncs (a method's adapters, a
generator, a trainable teacher) get their gradients averaged over ranks in ``Step.update``: two
gloo processes on different data end with identical adapters, equal to one process's adapter
trained on the same global batches."""

from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

from sqakd.config import TrainConfig
from sqakd.engine import RunLog, Trainer
from sqakd.engine.distributed import DistributedContext, average_gradients
from sqakd.methods import Method, Needs

GLOBAL_BATCHES = 3


class AdapterOnly(Method):
    """A float student and a linear adapter on its output, trained to match fixed targets."""

    needs = Needs(labels=True, teacher="none", quantized_student=False)

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(3)
        self.adapter = nn.Linear(2, 2)

    def losses(self, models, batch, phase):
        output = self.adapter(models.student(batch.images))
        return {"mse": F.mse_loss(output, batch.labels.float())}


def global_batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(0)
    return [
        (torch.randn(4, 3, generator=generator), torch.randint(0, 2, (4, 2), generator=generator))
        for _ in range(GLOBAL_BATCHES)
    ]


def train(rank: int, world_size: int, folder: Path) -> dict[str, torch.Tensor]:
    torch.manual_seed(1)
    student = nn.Linear(3, 2)
    method = AdapterOnly()
    share = 4 // world_size  # each rank its slice of every global batch
    batches = [(x[rank * share : (rank + 1) * share], y[rank * share : (rank + 1) * share])
               for x, y in global_batches()]  # fmt: skip
    context = DistributedContext(rank=rank, world_size=world_size, backend="gloo")
    trainer = Trainer(student, None, method, batches,
                      TrainConfig(epochs=2, weights={"name": "sgd", "lr": 0.1, "momentum": 0.0}),
                      torch.device("cpu"), RunLog(folder, enabled=False), progress=False,
                      distributed=context)  # fmt: skip
    trainer.fit()
    return {k: v.clone() for k, v in method.adapter.state_dict().items()}


def worker(rank: int, world_size: int, store: str, folder: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world_size)
    try:
        torch.set_num_threads(1)
        grads = [nn.Parameter(torch.zeros(2)), nn.Parameter(torch.zeros(3))]
        for index, parameter in enumerate(grads):
            parameter.grad = torch.full_like(parameter, float(rank + 1 + index))
        average_gradients(grads, DistributedContext(rank=rank, world_size=world_size))
        adapter = train(rank, world_size, Path(folder))
        torch.save({"grads": [p.grad for p in grads], "adapter": adapter},
                   os.path.join(folder, f"rank{rank}.pt"))  # fmt: skip
        dist.barrier()  # neither rank closes its sockets while the other still reads from them
    finally:
        dist.destroy_process_group()


def test_two_ranks_average_the_adapter_gradients(tmp_path):
    mp.spawn(worker, args=(2, str(tmp_path / "store"), str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    for rank in ranks:  # (1 + 2) / 2 and (2 + 3) / 2
        torch.testing.assert_close(rank["grads"][0], torch.full((2,), 1.5))
        torch.testing.assert_close(rank["grads"][1], torch.full((3,), 2.5))
    single = train(0, 1, tmp_path)
    for key, value in single.items():
        torch.testing.assert_close(
            ranks[0]["adapter"][key], ranks[1]["adapter"][key], rtol=0, atol=0
        )
        torch.testing.assert_close(ranks[0]["adapter"][key], value, rtol=1e-5, atol=1e-6)
