"""The frozen teacher: batch norm folded into its convolutions, same outputs, no gradients."""

import torch
from torch import nn

from sqakd.engine.inference import frozen_for_inference
from sqakd.models import build_model


def randomised_batchnorm(model: nn.Module) -> nn.Module:
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.running_mean.uniform_(-0.5, 0.5)
            module.running_var.uniform_(0.5, 2.0)
            module.weight.data.uniform_(0.5, 1.5)
            module.bias.data.uniform_(-0.2, 0.2)
    return model


def test_folded_teacher_computes_the_same_logits_without_batchnorm():
    torch.manual_seed(0)
    teacher = randomised_batchnorm(build_model("resnet20", num_classes=10)).eval()
    images = torch.randn(16, 3, 32, 32)
    frozen = frozen_for_inference(teacher)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in frozen.modules())
    assert all(not p.requires_grad for p in frozen.parameters())
    with torch.no_grad():
        torch.testing.assert_close(frozen(images), teacher(images), rtol=1e-4, atol=1e-5)
    assert any(isinstance(m, nn.BatchNorm2d) for m in teacher.modules())  # original untouched
    assert all(p.requires_grad for p in teacher.parameters())


class DataDependent(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv, self.norm = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)

    def forward(self, x):
        if x.sum() > 0:  # torch.fx cannot trace this
            x = -x
        return self.norm(self.conv(x))


def test_an_untraceable_teacher_is_used_unfused():
    frozen = frozen_for_inference(DataDependent())
    assert isinstance(frozen, DataDependent) and not frozen.training
    assert all(not p.requires_grad for p in frozen.parameters())
    reference = DataDependent().eval()
    reference.load_state_dict(frozen.state_dict())
    images = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        assert torch.equal(frozen(images), reference(images))
