"""Retrieval metrics and loss against hand-computed tiny examples (exact values)."""

from __future__ import annotations

import math

import pytest
import torch

from vitkit.tasks.retrieval import (
    leave_one_out_ranking,
    map_at_r,
    retrieval_metrics,
    supervised_contrastive_loss,
)


def unit(degrees: list[float]) -> torch.Tensor:
    a = torch.tensor(degrees, dtype=torch.float64) * math.pi / 180
    return torch.stack([a.cos(), a.sin()], 1)


def test_map_at_r_divides_by_r_and_torchmetrics_map_does_not():
    """R = 3, ranking relevant, not, relevant, relevant: mAP@R = (1/3)(1/1 + 2/3) = 5/9 (the hit at
    rank 4 is past R). torchmetrics' average precision with top_k=R averages over the hits it found
    in the top R: (1/1 + 2/3) / 2 = 5/6 — a different metric, which is why vitkit computes mAP@R."""
    from torchmetrics.functional.retrieval import retrieval_average_precision

    rel = torch.tensor([[True, False, True, True, False]])
    assert map_at_r(rel, torch.tensor([3])).item() == pytest.approx(5 / 9, abs=1e-12)
    scores = torch.tensor([0.9, 0.8, 0.7, 0.6, 0.5])
    tm = retrieval_average_precision(scores, rel[0], top_k=3).item()
    assert tm == pytest.approx(5 / 6, abs=1e-6)
    # all R relevant items first: both give 1
    rel = torch.tensor([[True, True, False]])
    assert map_at_r(rel, torch.tensor([2])).item() == 1.0


def test_leave_one_out_metrics_on_points_of_a_circle():
    """Five unit vectors at 0, 20, 90, 30, 100 degrees, labels 0 0 0 1 1. By hand (nearest = smallest
    angle): query 0 ranks 1,3,2,4 (rel 1 0 1 0, R=2: AP@R 1/2), query 1 ranks 3,0,2,4 (0 1 1 0: 1/4),
    query 2 ranks 4,3,1,0 (0 0 1 1: 0), query 3 ranks 1,0,2,4 (R=1: 0), query 4 ranks 2,3,1,0 (0).
    mAP@R = 0.75/5, R-precision = (1/2 + 1/2)/5, recall@1 = 1/5, recall@5 = recall@10 = 1."""
    x = unit([0, 20, 90, 30, 100])
    labels = torch.tensor([0, 0, 0, 1, 1])
    assert leave_one_out_ranking(x, 4).tolist() == [
        [1, 3, 2, 4],
        [3, 0, 2, 4],
        [4, 3, 1, 0],
        [1, 0, 2, 4],
        [2, 3, 1, 0],
    ]
    m = retrieval_metrics(x, labels)
    assert m["map_at_r"] == pytest.approx(0.15, abs=1e-12)
    assert m["r_precision"] == pytest.approx(0.2, abs=1e-12)
    assert m["recall_at_1"] == pytest.approx(0.2, abs=1e-7)
    assert m["recall_at_5"] == m["recall_at_10"] == 1.0
    assert m["recall_curve"][:4] == pytest.approx([0.2, 0.6, 0.8, 1.0], abs=1e-7)
    assert m["queries"] == 5 and m["search"] == "cosine"
    # scale does not matter for cosine search
    assert (
        retrieval_metrics(x * torch.tensor([[3.0], [0.1], [7.0], [1.0], [2.0]], dtype=torch.float64), labels)
        == m
    )


def test_hamming_search_uses_signs_and_breaks_ties_by_index():
    """Codes (signs) 1111 / 111- / 11-1 / ----, labels 0 1 0 1. Hamming distances: q0 -> 1:1, 2:1 (tie:
    index 1 first), 3:4; q1 -> 0:1, 2:2, 3:3; q2 -> 0:1, 1:2, 3:3; q3 -> 1:3, 2:3 (tie), 0:4.
    Relevance: q0 0 1 0, q1 0 0 1, q2 1 0 0, q3 1 0 0 (R = 1 each): mAP@R = 2/4, recall@1 = 2/4,
    recall@2 = 3/4."""
    signs = torch.tensor([[1, 1, 1, 1], [1, 1, 1, -1], [1, 1, -1, 1], [-1, -1, -1, -1]], dtype=torch.float32)
    magnitudes = torch.tensor(
        [[0.3, 2.0, 0.01, 5.0], [1.0, 0.2, 3.0, 0.7], [4.0, 0.5, 0.1, 0.9], [0.6, 0.6, 2.0, 1.0]]
    )
    z = signs * magnitudes  # only the signs may matter
    labels = torch.tensor([0, 1, 0, 1])
    assert leave_one_out_ranking(z, 3, hamming=True).tolist() == [[1, 2, 3], [0, 2, 3], [0, 1, 3], [1, 2, 0]]
    m = retrieval_metrics(z, labels, hamming=True)
    assert m["map_at_r"] == 0.5 and m["recall_at_1"] == 0.5
    assert m["recall_curve"][1] == 0.75
    assert m["search"] == "hamming"


def test_singleton_classes_are_not_queries():
    m = retrieval_metrics(unit([0, 10, 90]), torch.tensor([0, 0, 1]))
    assert m["queries"] == 2 and m["map_at_r"] == 1.0 and m["recall_at_1"] == 1.0


def test_supervised_contrastive_loss_by_hand():
    """e0 = e1 = (1, 0), e2 = (0, 1), labels 0 0 1, temperature 1. Anchors 0 and 1 each have one
    positive at similarity 1 and one negative at 0: -log(e / (e + 1)) = log(1 + 1/e); anchor 2 has no
    positive and is left out."""
    e = torch.tensor([[1.0, 0.0], [2.0, 0.0], [0.0, 1.0]], requires_grad=True)
    loss = supervised_contrastive_loss(e, torch.tensor([0, 0, 1]), temperature=1.0)
    assert loss.item() == pytest.approx(math.log(1 + math.exp(-1)), abs=1e-6)
    loss.backward()  # differentiable
    none = supervised_contrastive_loss(e, torch.tensor([0, 1, 2]))
    assert none.item() == 0.0 and none.requires_grad
