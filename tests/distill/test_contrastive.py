"""CRD: the NCE loss against a hand computation on the scored rows; the memory bank changes only
the batch's rows and only after the update; negatives never include the sample itself (instance)
or its class (class-aware); missing indices or labels say what to set."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from sqakd.distill import BuildContext, build_feature_loss

TAP = "fc:input"


def crd(sampler="instance", train_size=20, negatives=7, labels=False):
    return build_feature_loss("crd", {TAP: (6,)}, {TAP: (6,)},
                              BuildContext(train_size=train_size, labels=labels),
                              embed_dim=4, negatives=negatives, sampler=sampler)  # fmt: skip


def test_the_loss_equals_the_nce_formula_on_the_scored_rows():
    torch.manual_seed(0)
    loss = crd()
    s, t, index = torch.randn(3, 6), torch.randn(3, 6), torch.tensor([2, 5, 11])
    value = float(loss({TAP: s}, {TAP: t}, index=index))
    rows = loss.contrast_indices(index, None)  # the same draw (the counter has not moved)
    assert rows.shape == (3, 8) and torch.equal(rows[:, 0], index)
    with torch.no_grad():
        v_s = F.normalize(loss.embed_student(s), dim=1)
        v_t = F.normalize(loss.embed_teacher(t), dim=1)
    n, k, tau = 20, 7, 0.1

    def side(anchor, bank):
        scores = [[math.exp(float(torch.dot(bank[int(j)], anchor[b])) / tau) for j in rows[b]]
                  for b in range(3)]  # fmt: skip
        z = sum(map(sum, scores)) / (3 * 8) * n
        total = 0.0
        for b in range(3):
            p = [x / z for x in scores[b]]
            total += math.log(p[0] / (p[0] + k / n + 1e-7))
            total += sum(math.log((k / n) / (q + k / n + 1e-7)) for q in p[1:])
        return -total / 3

    expected = side(v_s, loss.memory_teacher) + side(v_t, loss.memory_student)
    assert value == pytest.approx(expected, rel=1e-5)


def test_the_memory_bank_updates_only_the_batch_rows_after_the_step():
    loss = crd()
    before = {k: v.clone() for k, v in loss.state_dict().items()}
    index = torch.tensor([1, 4, 9])
    loss({TAP: torch.randn(3, 6)}, {TAP: torch.randn(3, 6)}, index=index)
    assert all(torch.equal(before[k], v) for k, v in loss.state_dict().items())  # forward: nothing
    loss.after_update()
    for name in ("memory_student", "memory_teacher"):
        changed = (loss.state_dict()[name] != before[name]).any(1).nonzero().flatten()
        assert changed.tolist() == [1, 4, 9]
        torch.testing.assert_close(loss.state_dict()[name][index].norm(dim=1), torch.ones(3))
    assert loss.z_student > 0 and loss.z_teacher > 0 and int(loss.draws) == 1


def test_negatives_skip_the_sample_itself_or_its_class():
    loss = crd("instance", train_size=5, negatives=200)
    rows = loss.contrast_indices(torch.tensor([0, 3]), None)
    assert not (rows[:, 1:] == rows[:, :1]).any() and set(rows[:, 1:].flatten().tolist()) <= set(
        range(5)
    )
    loss = crd("class", train_size=6, negatives=100, labels=True)
    labels = torch.tensor([0, 1, 0, 1, 2, 2])
    loss({TAP: torch.randn(6, 6)}, {TAP: torch.randn(6, 6)}, index=torch.arange(6), labels=labels)
    rows = loss.contrast_indices(torch.tensor([0, 1]), torch.tensor([0, 1]))
    assert not (labels[rows[0, 1:]] == 0).any() and not (labels[rows[1, 1:]] == 1).any()


def test_gradients_reach_the_student_and_both_embeddings_never_the_teacher():
    loss = crd()
    s, t = torch.randn(3, 6, requires_grad=True), torch.randn(3, 6, requires_grad=True)
    loss({TAP: s}, {TAP: t}, index=torch.tensor([0, 1, 2])).backward()
    assert s.grad.abs().sum() > 0 and t.grad is None
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in loss.parameters())


def test_missing_indices_or_labels_say_what_to_set():
    with pytest.raises(ValueError, match=r"needs each sample's index.*Needs\(sample_index=True\)"):
        crd()({TAP: torch.randn(2, 6)}, {TAP: torch.randn(2, 6)})
    with pytest.raises(
        ValueError, match="set method.labels: true, or method.loss_options.crd.sampler: instance"
    ):
        crd("class")({TAP: torch.randn(2, 6)}, {TAP: torch.randn(2, 6)}, index=torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="training set has 0"):
        crd(train_size=0)
