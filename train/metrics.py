"""Full-ranking metrics: Recall, NDCG and MRR at k, with the user's history excluded."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch


def target_ranks(scores: torch.Tensor, targets: torch.Tensor, exclude: Sequence[Sequence[int]]) -> torch.Tensor:
    """0-based rank of each target among all items, history items removed; ``scores`` is ``(U, I)``.

    Ties count against the target (an item scoring equal to it ranks ahead), so a constant scorer gets no
    credit. The target itself is never excluded, even if it also appears in the history.
    """
    scores = scores.float()
    rows = torch.arange(len(targets), device=scores.device)
    target_scores = scores[rows, targets]  # (U,), read before masking
    masked = scores.clone()
    for u, items in enumerate(exclude):
        if len(items):
            masked[u, torch.as_tensor(np.asarray(items), dtype=torch.long, device=scores.device)] = float("-inf")
    masked[rows, targets] = float("nan")  # the target never competes with itself (NaN compares False)
    ahead = (masked >= target_scores[:, None]).sum(1)
    return ahead


def ranking_metrics(ranks: torch.Tensor | np.ndarray, ks: Sequence[int] = (5, 10, 20)) -> dict[str, float]:
    """Recall@k, NDCG@k and MRR@k (single relevant item per user) from 0-based ranks."""
    r = torch.as_tensor(ranks, dtype=torch.float64)
    out: dict[str, float] = {}
    for k in ks:
        hit = r < k
        out[f"recall@{k}"] = float(hit.double().mean()) if len(r) else 0.0
        out[f"ndcg@{k}"] = float(torch.where(hit, 1.0 / torch.log2(r + 2.0), 0.0).mean()) if len(r) else 0.0
        out[f"mrr@{k}"] = float(torch.where(hit, 1.0 / (r + 1.0), 0.0).mean()) if len(r) else 0.0
    return out
