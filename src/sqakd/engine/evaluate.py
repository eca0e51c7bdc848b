"""Top-1, top-5 and loss of a model on a labeled loader."""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import Tensor, nn


@torch.no_grad()
def evaluate(
    model: nn.Module,
    batches: Iterable[tuple[Tensor, Tensor | None]],
    device: torch.device | str = "cpu",
) -> dict[str, float]:
    """Accuracy (percent) and mean cross-entropy over every labeled batch."""
    was_training = model.training
    model.eval()
    correct1 = correct5 = total = 0
    loss_sum = 0.0
    try:
        for images, labels in batches:
            if labels is None:
                raise ValueError(
                    "evaluation needs labels; give a labeled test split (data.test_split)"
                )
            images, labels = images.to(device), labels.to(device)
            logits = model(images)
            loss_sum += float(F.cross_entropy(logits, labels, reduction="sum"))
            top = logits.topk(min(5, logits.shape[1]), dim=1).indices
            correct1 += int((top[:, 0] == labels).sum())
            correct5 += int((top == labels[:, None]).any(dim=1).sum())
            total += labels.numel()
    finally:
        model.train(was_training)
    if total == 0:
        raise ValueError("evaluation got no images; check data.test_split and data.limit_test")
    return {
        "top1": 100.0 * correct1 / total,
        "top5": 100.0 * correct5 / total,
        "loss": loss_sum / total,
    }
