"""GDFQ's generator (shapes, output normalisation, labels used) and the BNS loss on values: zero
when a batch's statistics are the running ones, the mean over layers of the per-layer MSEs, and
falling while a generator learns to match a teacher's statistics."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from sqakd.zeroshot import BatchNormStatistics, ConditionalGenerator, batchnorm_layers


@pytest.mark.parametrize("shape", [(3, 8, 8), (1, 12, 16), (3, 32, 32)])
def test_generated_images_have_the_teachers_input_shape_and_are_standardised(shape):
    torch.manual_seed(0)
    generator = ConditionalGenerator(shape, num_classes=5)
    images, labels = generator.generate(16)
    assert images.shape == (16, *shape) and labels.shape == (16,)
    assert 0 <= int(labels.min()) and int(labels.max()) < 5
    # the last batch norm (no affine) standardises each channel over the batch
    torch.testing.assert_close(images.mean(dim=(0, 2, 3)), torch.zeros(shape[0]), atol=1e-5, rtol=0)
    variance = images.var(dim=(0, 2, 3), unbiased=False)  # var / (var + eps): about 1
    torch.testing.assert_close(variance, torch.ones(shape[0]), atol=2e-2, rtol=0)
    assert generator.seed_shape == (128, shape[1] // 4, shape[2] // 4)


def test_the_class_embedding_multiplies_the_latent():
    torch.manual_seed(0)
    generator = ConditionalGenerator((3, 8, 8), num_classes=3, width=16)
    latent = torch.randn(4, 100)
    same = generator(latent, torch.zeros(4, dtype=torch.long))
    with torch.no_grad():
        generator.embedding.weight[0].zero_()  # class 0's embedding zeroes its latents
        seeds = generator.project(
            generator.embedding(torch.zeros(1, dtype=torch.long)) * latent[:1]
        )
    torch.testing.assert_close(seeds[0], generator.project.bias)
    assert not torch.equal(same, generator(latent, torch.ones(4, dtype=torch.long)))
    hidden = [m for m in generator.body if isinstance(m, nn.BatchNorm2d)]
    assert [m.eps for m in hidden] == [1e-5, 0.8, 0.8, 1e-5] and not hidden[-1].affine


def test_a_size_that_is_not_a_multiple_of_4_is_a_one_line_error():
    with pytest.raises(ValueError, match="multiples of 4.*30x30") as error:
        ConditionalGenerator((3, 30, 30), num_classes=10)
    assert "\n" not in str(error.value)


def two_batchnorm_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.BatchNorm2d(3), nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU())


def set_running_statistics_to_the_batch(model: nn.Module, images: torch.Tensor) -> None:
    """Every batch norm's running statistics = the batch mean and biased variance of its input
    (as the network computes it in train mode)."""
    inputs = {}
    hooks = [m.register_forward_pre_hook(lambda m, a: inputs.__setitem__(m, a[0].detach()))
             for _, m in batchnorm_layers(model)]  # fmt: skip
    model.train()
    with torch.no_grad():
        model(images)
    for hook in hooks:
        hook.remove()
    for layer, x in inputs.items():
        layer.running_mean.copy_(x.mean(dim=(0, 2, 3)))
        layer.running_var.copy_(x.var(dim=(0, 2, 3), unbiased=False))
    model.eval()


def test_bns_is_zero_for_a_batch_with_the_running_statistics_and_the_mean_of_layer_mses():
    model = two_batchnorm_net()
    images = torch.randn(8, 3, 6, 6) * 2 + 1
    set_running_statistics_to_the_batch(model, images)
    statistics = BatchNormStatistics(model)
    model(images)
    assert float(statistics.loss().detach()) == pytest.approx(0.0, abs=1e-10)
    # shift the first layer's running mean by 1 in every channel: that layer's MSE is 1 (its
    # input is unchanged); the second layer's input changes with it, so its term is recomputed
    with torch.no_grad():
        model[0].running_mean.add_(1.0)
    inputs = []
    hook = model[2].register_forward_pre_hook(lambda m, a: inputs.append(a[0]))
    model(images)
    hook.remove()
    second = inputs[0]
    expected_second = F.mse_loss(second.mean(dim=(0, 2, 3)), model[2].running_mean) + F.mse_loss(
        second.var(dim=(0, 2, 3), unbiased=False), model[2].running_var
    )
    expected = (1.0 + expected_second) / 2
    torch.testing.assert_close(statistics.loss(), expected)
    statistics.remove()
    model(images)
    with pytest.raises(RuntimeError, match="no forward"):
        statistics.loss()


def test_a_model_without_batch_norm_has_no_statistics_to_match():
    with pytest.raises(ValueError, match="no BatchNorm2d") as error:
        BatchNormStatistics(nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU()))
    assert "\n" not in str(error.value)


def test_bns_falls_over_a_few_generator_steps():
    torch.manual_seed(0)
    teacher = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 3),
    )  # fmt: skip
    teacher.train()
    with torch.no_grad():  # "training data" with a colour cast the generator must find
        for _ in range(20):
            teacher(
                torch.randn(32, 3, 8, 8) * 0.5 + torch.tensor([1.0, -1.0, 0.5]).view(1, 3, 1, 1)
            )
    teacher.eval().requires_grad_(False)
    statistics = BatchNormStatistics(teacher)
    generator = ConditionalGenerator((3, 8, 8), num_classes=3, width=32)
    optimizer = torch.optim.Adam(generator.parameters(), lr=1e-2, betas=(0.5, 0.999))
    values = []
    for _ in range(20):
        teacher(generator.generate(32)[0])
        loss = statistics.loss()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        values.append(float(loss.detach()))
    assert sum(values[-5:]) / 5 < 0.6 * values[0]
    assert all(p.grad is None for p in teacher.parameters())
