"""The evaluation protocol: iterative k-core, chronological leave-one-out, target ranks and ranking metrics.

This reproduces the protocol of the datasets README (and LlamaRec's): every interaction counts, the k-core
filter drops items then users with fewer than ``k`` interactions until nothing changes, each user's items are
sorted by (timestamp, item_id), the last item is the test target and the second-to-last the validation target.
Ranking is over all items that survive the filter, with the user's history excluded (but never the target
itself, even when the user saw it before: :func:`held_out` is the one place that decides this, for the
training loop and the served evaluation alike).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import polars as pl
import torch

from configs import Config
from data.catalog import Catalog
from errors import CatalogError

logger = logging.getLogger(__name__)


def k_core(interactions: pl.DataFrame, k: int) -> pl.DataFrame:
    """Iteratively drop items, then users, with fewer than ``k`` interactions until stable."""
    df = interactions
    while True:
        before = df.height
        df = df.filter(pl.len().over("item_id") >= k)
        df = df.filter(pl.len().over("user_id") >= k)
        if df.height == before:
            return df


@dataclass(frozen=True)
class Split:
    """Leave-one-out split over dense indices.

    ``item_ids[j]`` is the user's id of dense item ``j``; ``user_ids[u]`` likewise. ``sequences[u]`` holds
    user ``u``'s dense item indices in chronological order; ``train = seq[:-2]``, ``valid = seq[-2]``,
    ``test = seq[-1]``.
    """

    user_ids: list
    item_ids: list
    sequences: list[np.ndarray]

    @property
    def num_items(self) -> int:
        return len(self.item_ids)

    @property
    def num_users(self) -> int:
        return len(self.user_ids)

    def train_seq(self, u: int) -> np.ndarray:
        return self.sequences[u][:-2]

    def valid_target(self, u: int) -> int:
        return int(self.sequences[u][-2])

    def test_target(self, u: int) -> int:
        return int(self.sequences[u][-1])

    def num_interactions(self) -> int:
        return int(sum(len(s) for s in self.sequences))


TIE_BREAKS = ("item_id", "input_order")


def leave_one_out(interactions: pl.DataFrame, min_count: int = 5, tie_break: str = "item_id") -> Split:
    """Apply the k-core filter and build chronological sequences (test = last, validation = second-to-last).

    Interactions with equal timestamps are ordered by ``tie_break``: ``"item_id"`` (LlamaRec's protocol) or
    ``"input_order"`` (a stable sort on the table's row order, as RecBole does). On MovieLens-100K, 44% of
    users have a tie at their last timestamp, so the choice changes which item is the test target.
    """
    if tie_break not in TIE_BREAKS:
        raise CatalogError(f"unknown tie_break {tie_break!r}; choose one of {TIE_BREAKS}")
    df = k_core(interactions.select("user_id", "item_id", "timestamp").with_row_index("_row"), min_count)
    if df.height == 0:
        raise CatalogError(f"no interactions survive the {min_count}-core filter ({interactions.height} "
                           f"interactions before it); lower data.min_count (at least 3) or add data")
    short = df.group_by("user_id").len().filter(pl.col("len") < 3)
    if short.height:
        raise CatalogError(
            f"user {short['user_id'][0]!r} has fewer than 3 interactions; leave-one-out needs data.min_count >= 3"
        )
    item_ids = df["item_id"].unique().sort().to_list()
    item_index = pl.DataFrame({"item_id": item_ids, "item_idx": np.arange(len(item_ids), dtype=np.int64)},
                              schema={"item_id": df["item_id"].dtype, "item_idx": pl.Int64})
    grouped = (
        df.join(item_index, on="item_id")
        .sort(["user_id", "timestamp", "item_id" if tie_break == "item_id" else "_row"])
        .group_by("user_id", maintain_order=True)
        .agg(pl.col("item_idx"))
    )
    user_ids = grouped["user_id"].to_list()
    sequences = [np.asarray(s, dtype=np.int64) for s in grouped["item_idx"].to_list()]
    split = Split(user_ids=user_ids, item_ids=item_ids, sequences=sequences)
    logger.info("%d-core split: %d users, %d items, %d interactions",
                min_count, split.num_users, split.num_items, split.num_interactions())
    return split


def split_catalog(config: Config, catalog: Catalog) -> Split:
    """The leave-one-out split of a catalog, with the tie-break the config (or the catalog) asks for."""
    tie_break = config.data.tie_break
    if tie_break == "auto":
        tie_break = catalog.meta.get("tie_break", "item_id")
    return leave_one_out(catalog.interactions, config.data.min_count, tie_break)


def held_out(split: Split, u: int, which: Literal["valid", "test"]) -> tuple[int, np.ndarray, np.ndarray]:
    """``(target, history, exclude)`` of user ``u`` for the validation or the test target.

    ``history`` is what the user tower reads (every item before the target, in order). ``exclude`` is what is
    removed from the ranking: the history, minus the target itself should the user have seen it before (a
    re-watch still has to be ranked). Both the training loop and the served evaluation use this.
    """
    seq = split.sequences[u]
    if which == "valid":
        target, history = int(seq[-2]), seq[:-2]
    elif which == "test":
        target, history = int(seq[-1]), seq[:-1]
    else:
        raise ValueError(f"which must be 'valid' or 'test', got {which!r}")
    return target, history, history[history != target]



def target_ranks(scores: torch.Tensor, targets: torch.Tensor, exclude: Sequence[Sequence[int]]) -> torch.Tensor:
    """0-based rank of each target among all items, history items removed; ``scores`` is ``(U, I)``.

    Ties count against the target (an item scoring equal to it ranks ahead), so a constant scorer gets no
    credit. The target itself is never excluded, even if it also appears in ``exclude``.
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


def popularity_metrics(split: Split, which: Literal["valid", "test"]) -> dict[str, float]:
    """Pop: every user gets the most popular items they have not seen, under the same full-ranking protocol.

    An item's popularity is its number of interactions before the ranked target, over all users (what the
    models read then: for the test target the validation items count too). Ties go to the lower item index.
    """
    counts = torch.zeros(split.num_items, dtype=torch.float64)
    for seq in split.sequences:
        history = seq[:-1] if which == "test" else seq[:-2]
        counts.index_add_(0, torch.as_tensor(np.asarray(history, dtype=np.int64)), torch.ones(len(history),
                                                                                              dtype=torch.float64))
    # Scores strictly decrease along (count desc, index asc), so no two items tie.
    order = torch.argsort(-counts, stable=True)  # most popular first; equal counts keep the index order
    scores = torch.empty(split.num_items, dtype=torch.float32)
    scores[order] = -torch.arange(split.num_items, dtype=torch.float32)
    ranks = []
    for start in range(0, split.num_users, 1024):
        held = [held_out(split, u, which) for u in range(start, min(split.num_users, start + 1024))]
        ranks.append(target_ranks(scores[None].expand(len(held), -1), torch.tensor([t for t, _, _ in held]),
                                  [ex for _, _, ex in held]))
    out = ranking_metrics(torch.cat(ranks))
    out["users"] = split.num_users
    return out


def list_rank(ranked: Sequence, target, depth: int) -> int:
    """0-based position of ``target`` in a ranked list, or ``depth`` (a miss at every cut-off) if absent."""
    ranked = list(ranked[:depth])
    return ranked.index(target) if target in ranked else depth


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
