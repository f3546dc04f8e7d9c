"""Full-ranking ranks and Recall/NDCG/MRR (train/metrics.py)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from data.protocol import ranking_metrics, target_ranks


def test_target_ranks_exclusion_and_ties() -> None:
    scores = torch.tensor([
        [0.1, 0.9, 0.5, 0.5, 0.2],  # target 2; item 1 is ahead, item 3 ties (counts ahead)
        [0.3, 0.8, 0.1, 0.9, 0.0],  # target 1 is also in the history; item 3 (ahead) is history
        [0.0, 0.0, 0.0, 0.0, 0.0],  # constant scorer: every other item ties ahead of the target
    ])
    targets = torch.tensor([2, 1, 0])
    assert target_ranks(scores, targets, [[], [], []]).tolist() == [2, 1, 4]
    assert target_ranks(scores, targets, [[1], [1, 3], [4]]).tolist() == [1, 0, 3]
    # the exclusion of a tied item removes the tie
    assert target_ranks(scores, targets, [[1, 3], [], []]).tolist() == [0, 1, 4]


def test_target_ranks_accepts_arrays_and_keeps_scores() -> None:
    scores = torch.tensor([[3.0, 1.0, 2.0, 0.0]], dtype=torch.float16)
    before = scores.clone()
    ranks = target_ranks(scores, torch.tensor([3]), [np.array([0, 2])])
    assert ranks.tolist() == [1]
    assert torch.equal(scores, before)


def test_ranking_metrics_exact() -> None:
    ranks = torch.tensor([0, 1, 4, 10, 25])
    m = ranking_metrics(ranks, ks=(1, 5, 10))
    assert set(m) == {f"{name}@{k}" for name in ("recall", "ndcg", "mrr") for k in (1, 5, 10)}
    assert m["recall@1"] == pytest.approx(1 / 5)
    assert m["ndcg@1"] == pytest.approx(1 / 5)
    assert m["mrr@1"] == pytest.approx(1 / 5)
    assert m["recall@5"] == pytest.approx(3 / 5)
    assert m["ndcg@5"] == pytest.approx((1 + 1 / math.log2(3) + 1 / math.log2(6)) / 5)
    assert m["mrr@5"] == pytest.approx((1 + 1 / 2 + 1 / 5) / 5)
    # rank 10 is the 11th place: outside the top 10
    assert m["recall@10"] == m["recall@5"]
    assert m["ndcg@10"] == m["ndcg@5"]
    assert m["mrr@10"] == m["mrr@5"]


def test_ranking_metrics_single_values() -> None:
    assert ranking_metrics(np.array([0]), ks=(10,)) == {"recall@10": 1.0, "ndcg@10": 1.0, "mrr@10": 1.0}
    m = ranking_metrics([1], ks=(10,))
    assert m["ndcg@10"] == pytest.approx(1 / math.log2(3))
    assert m["mrr@10"] == pytest.approx(0.5)
    assert ranking_metrics([9, 10], ks=(10,))["recall@10"] == pytest.approx(0.5)


def test_ranking_metrics_empty() -> None:
    assert ranking_metrics(torch.tensor([], dtype=torch.long), ks=(5,)) == {
        "recall@5": 0.0, "ndcg@5": 0.0, "mrr@5": 0.0}


def test_ranks_feed_metrics() -> None:
    scores = torch.tensor([[0.9, 0.1, 0.2], [0.1, 0.2, 0.9]])
    ranks = target_ranks(scores, torch.tensor([0, 0]), [[], [2]])
    assert ranks.tolist() == [0, 1]
    assert ranking_metrics(ranks, ks=(1,)) == {"recall@1": 0.5, "ndcg@1": 0.5, "mrr@1": 0.5}
