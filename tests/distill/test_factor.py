"""FT: the L1 distance of channel-mean-of-squares factors of the translator's and the
paraphraser's encoder outputs; zero with a matched translator; the paraphraser's pre-stage loss is
its reconstruction error; gradients never reach the paraphraser or the teacher in the main loss."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from sqakd.distill import BuildContext, build_feature_loss
from sqakd.distill.factor import factor

TAP = "layer3"


def ft(cs=8, ct=8):
    return build_feature_loss("ft", {TAP: (cs, 4, 4)}, {TAP: (ct, 4, 4)}, BuildContext())


def test_the_loss_is_the_l1_distance_of_the_factors():
    torch.manual_seed(0)
    loss = ft(6, 8)
    s, t = torch.randn(2, 6, 4, 4), torch.randn(2, 8, 4, 4)
    with torch.no_grad():
        a = factor(loss.translators[TAP](s))
        b = factor(loss.paraphrasers[TAP].encoder(t))
        maps = loss.paraphrasers[TAP].encoder(t).pow(2).mean(1).flatten(1)
    torch.testing.assert_close(b, maps / maps.norm(dim=1, keepdim=True))
    assert float(loss({TAP: s}, {TAP: t})) == pytest.approx(float((a - b).abs().mean()), rel=1e-6)
    assert loss.translators[TAP][-3].out_channels == 4  # the factor has half the teacher's channels


def test_zero_with_a_translator_matched_to_the_paraphraser():
    torch.manual_seed(1)
    loss = ft()
    translator, encoder = loss.translators[TAP], loss.paraphrasers[TAP].encoder
    with torch.no_grad():
        for conv, bn, source in ((translator[0], translator[1], encoder[0]),
                                 (translator[3], translator[4], encoder[2]),
                                 (translator[6], translator[7], encoder[4])):  # fmt: skip
            conv.load_state_dict(source.state_dict())
            bn.running_var.fill_(1 - bn.eps)
    loss.eval()
    f = torch.randn(2, 8, 4, 4)
    assert float(loss({TAP: f}, {TAP: f.clone()})) == pytest.approx(0.0, abs=1e-6)
    assert float(loss({TAP: f}, {TAP: torch.randn(2, 8, 4, 4)})) > 0


def test_pre_stage_reconstructs_and_the_main_loss_leaves_the_paraphraser_alone():
    loss = ft()
    t = torch.randn(2, 8, 4, 4, requires_grad=True)
    pre = loss.pre_stage_loss(None, {TAP: t})
    with torch.no_grad():
        expected = F.mse_loss(loss.paraphrasers[TAP](t), t)
    assert float(pre) == pytest.approx(float(expected))
    assert loss.pre_stage_modules() == [loss.paraphrasers]
    s = torch.randn(2, 8, 4, 4, requires_grad=True)
    loss({TAP: s}, {TAP: t}).backward()
    assert s.grad.abs().sum() > 0 and t.grad is None
    assert all(p.grad is None for p in loss.paraphrasers.parameters())
    assert all(p.grad is not None for p in loss.translators.parameters())
