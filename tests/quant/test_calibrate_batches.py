"""calibrate() takes data the way PyTorch users hold it: tensors, (x, y) pairs, dicts."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

from sqakd.quant import QuantPolicy, calibrate, prepare, quantized_layers


def _student() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 3), nn.Flatten(),
                          nn.Linear(8 * 4 * 4, 4))  # fmt: skip
    return prepare(model, QuantPolicy(method="lsq", weight_bits=4, act_bits=4))


class DictImages(Dataset):
    def __init__(self, images: torch.Tensor, key: str = "pixel_values") -> None:
        self.images, self.key = images, key

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {self.key: self.images[index], "label": torch.tensor(0)}


IMAGES = torch.randn(8, 3, 8, 8)


def _calibrated(model: nn.Module) -> bool:
    return all(bool(layer.calibrated) for _, layer in quantized_layers(model))


def _ranges(model: nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for n, p in model.named_parameters() if "quantizer" in n]


def test_a_dataloader_of_tuples_calibrates_like_the_bare_tensor():
    reference = _student()
    calibrate(reference, [IMAGES])
    student = _student()
    labels = torch.zeros(8, dtype=torch.long)
    assert calibrate(student, DataLoader(TensorDataset(IMAGES, labels), batch_size=8)) == 1
    assert _calibrated(student)
    for a, b in zip(_ranges(reference), _ranges(student)):
        torch.testing.assert_close(a, b)


def test_a_dataloader_of_dicts_calibrates():
    student = _student()
    calibrate(student, DataLoader(DictImages(IMAGES), batch_size=8))  # a default key
    assert _calibrated(student)
    other = _student()
    calibrate(other, DataLoader(DictImages(IMAGES, "audio"), batch_size=8), input_key="audio")
    assert _calibrated(other)
    third = _student()
    calibrate(third, [{"x": IMAGES}], batch_to_inputs=lambda batch: batch["x"] * 1)
    assert _calibrated(third)


def test_a_missing_input_key_names_the_keys_present():
    loader = DataLoader(DictImages(IMAGES, "audio"), batch_size=8)
    with pytest.raises(ValueError, match=r"has 'wave'; its keys are 'audio', 'label'"):
        calibrate(_student(), loader, input_key="wave")
    with pytest.raises(ValueError, match=r"its keys are 'audio', 'label': give input_key"):
        calibrate(_student(), loader)
