"""Contrastive losses over embeddings only (no model code here)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def info_nce(users: torch.Tensor, items: torch.Tensor, targets: torch.Tensor, logit_scale: torch.Tensor,
             logq: torch.Tensor | None = None, max_scale: float = 100.0, reduction: str = "mean") -> torch.Tensor:
    """Softmax cross-entropy of each user against a shared set of candidate items.

    ``users (N, D)`` and ``items (M, D)`` are L2-normalised; ``targets (N,)`` indexes each user's positive in
    ``items``. Every other row of ``items`` is a negative: with ``items`` = the unique items of the batch
    this is InfoNCE with in-batch negatives (duplicates of a positive are never negatives, because each item
    appears once). ``logit_scale`` is ``log(1/temperature)``, clamped so the temperature stays above
    ``1/max_scale``. ``logq (M,)``, if given, subtracts the log sampling probability of each candidate
    (sampled-softmax correction). ``reduction`` is ``"mean"`` or ``"sum"`` over users.
    """
    if users.dim() != 2 or items.dim() != 2 or users.shape[1] != items.shape[1]:
        raise ValueError(f"info_nce: users {tuple(users.shape)} and items {tuple(items.shape)} must be (N, D), (M, D)")
    if targets.shape != (users.shape[0],):
        raise ValueError(f"info_nce: targets {tuple(targets.shape)} must be ({users.shape[0]},)")
    scale = logit_scale.exp().clamp(max=max_scale)
    logits = scale * users @ items.T  # (N, M)
    if logq is not None:
        logits = logits - logq[None, :]
    return F.cross_entropy(logits, targets, reduction=reduction)


def inclusion_logq(freq: torch.Tensor, num_positives: int, num_uniform: int, num_items: int) -> torch.Tensor:
    """Log-probability that each candidate is in a sampled softmax's candidate set (the logQ correction).

    The candidates are the batch's ``num_positives`` positives, each drawn with probability ``freq`` (how often an
    item is a training target), plus ``num_uniform`` uniform draws from ``num_items`` items. An item is absent
    only if every draw misses it, so ``q = 1 - (1 - freq)^P (1 - 1/I)^K``. Frequent items are candidates more
    often, so their logits are *lowered* by ``log q`` (``logits - logq``); TFRS once shipped this sign flipped.
    """
    miss = (1 - freq.double()).pow(num_positives) * (1 - 1 / num_items) ** num_uniform
    return torch.log((1 - miss).clamp(min=1e-30))
