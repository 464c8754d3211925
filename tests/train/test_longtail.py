"""Long-tail tools: effective-number weights, DRW, class-aware sampling, logit adjustment."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from vitkit.errors import VitkitError
from vitkit.train.longtail import (
    DeferredReweighting,
    drw_start_epoch,
    effective_number_weights,
    inverse_frequency_weights,
    logit_adjust,
    sampling_indices,
)

# CIFAR-10-LT ρ=100 counts (DeiT-LT's profile: 5000·100^(−r/9))
CIFAR10_LT = [5000, 2997, 1796, 1077, 645, 387, 232, 139, 83, 50]


def test_effective_number_weights_match_the_formula():
    beta = 0.9999
    w = effective_number_weights(CIFAR10_LT, beta)
    raw = [(1 - beta) / (1 - beta**n) for n in CIFAR10_LT]
    expect = torch.tensor([r / sum(raw) * len(raw) for r in raw])
    torch.testing.assert_close(w, expect.float(), rtol=1e-6, atol=1e-6)
    assert w.sum().item() == pytest.approx(10.0, abs=1e-5)
    assert (w[1:] > w[:-1]).all()  # monotone toward the tail
    # β = 0 → equal weights; β → 1 → inverse frequency
    torch.testing.assert_close(effective_number_weights(CIFAR10_LT, 0.0), torch.ones(10))
    torch.testing.assert_close(
        effective_number_weights(CIFAR10_LT, 1 - 1e-9),
        inverse_frequency_weights(CIFAR10_LT),
        rtol=1e-3,
        atol=1e-3,
    )


def test_weights_bad_input():
    with pytest.raises(VitkitError, match="beta"):
        effective_number_weights(CIFAR10_LT, 1.0)
    with pytest.raises(VitkitError, match="non-negative"):
        effective_number_weights([5, -1])
    w = effective_number_weights([100, 0, 10])
    assert w[1] == 0 and w.sum().item() == pytest.approx(3.0, abs=1e-5)


def test_drw_switches_at_the_right_epoch():
    w = effective_number_weights(CIFAR10_LT)
    start = drw_start_epoch(10, 0.8)
    assert start == 8
    assert drw_start_epoch(1200, 1100) == 1100
    drw = DeferredReweighting(w, start)
    seen = []
    for epoch in range(10):
        drw.set_epoch(epoch)
        seen.append(drw.weights is not None)
    assert seen == [False] * 8 + [True] * 2
    assert DeferredReweighting(w, None).weights is None  # "no DRW" means never, not always
    with pytest.raises(VitkitError, match="outside training"):
        drw_start_epoch(10, 10)
    with pytest.raises(VitkitError, match="fraction"):
        drw_start_epoch(10, 1.5)


def test_balanced_sampling_frequencies():
    labels = torch.tensor([0] * 900 + [1] * 90 + [2] * 10)
    g = torch.Generator().manual_seed(0)
    idx = sampling_indices(labels, 30_000, g, power=0.0)
    freq = torch.bincount(labels[idx], minlength=3).float() / 30_000
    torch.testing.assert_close(freq, torch.full((3,), 1 / 3), atol=0.015, rtol=0)
    idx = sampling_indices(labels, 30_000, g, power=0.5)
    freq = torch.bincount(labels[idx], minlength=3).float() / 30_000
    sq = torch.tensor([30.0, 90**0.5, 10**0.5])
    torch.testing.assert_close(freq, sq / sq.sum(), atol=0.015, rtol=0)


def test_logit_adjustment_subtracts_log_prior():
    counts = [90, 9, 1]
    logits = torch.zeros(2, 3)
    adj = logit_adjust(logits, counts, tau=1.0)
    prior = torch.tensor(counts, dtype=torch.float) / 100
    torch.testing.assert_close(adj, -prior.log().expand(2, 3))
    assert adj.argmax(1).tolist() == [2, 2]  # with no evidence, the rarest class wins
    # τ = 0 is the identity; the CE of adjusted logits is what logit-adjusted training optimises
    torch.testing.assert_close(logit_adjust(logits, counts, tau=0.0), logits)
    assert F.cross_entropy(adj, torch.tensor([2, 2])) < F.cross_entropy(logits, torch.tensor([2, 2]))
    with pytest.raises(VitkitError, match="class counts"):
        logit_adjust(torch.zeros(1, 4), counts)
