"""The evaluation protocol: iterative k-core, chronological leave-one-out, target ranks and ranking metrics.

This reproduces the protocol of the datasets README (and LlamaRec's): every interaction counts, the k-core
filter drops items then users with fewer than ``k`` interactions until nothing changes, each user's items are
sorted by (timestamp, item_id), the last item is the test target and the second-to-last the validation target.
Ranking is over all items that survive the filter, with the user's history excluded (but never the target
itself, even when the user saw it before: :func:`held_out` is the one place that decides this, for the
training loop and the served evaluation alike).

``data.protocol`` chooses what is held out (:func:`apply_protocol`):

- ``warm``: the leave-one-out split above; every user is scored.
- ``cold-items``: a seeded share of the items is never trained on (not as an input, a target or a negative, and
  with no id vector); the users whose target is one of them are scored, over every item, new ones included.
- ``cold-users``: a seeded share of the users is never trained on, another share likewise for validation; each
  is scored from only their first 1, 3 and 5 items (:data:`COLD_USER_ITEMS`), the next item being the target.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Literal

import numpy as np
import polars as pl
import torch

from configs import PROTOCOLS, Config
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


COLD_USER_ITEMS = (1, 3, 5)  # cold-users: each cold user is scored from their first n items, for each n


@dataclass(frozen=True)
class Case:
    """One scored target: user ``user`` (split index) should rank item ``target`` after ``history``.

    ``first``: under cold-users, how many of the user's first items the history holds (0 otherwise)."""

    user: int
    target: int
    history: np.ndarray
    first: int = 0


@dataclass(frozen=True)
class Split:
    """Leave-one-out split over dense indices.

    ``item_ids[j]`` is the user's id of dense item ``j``; ``user_ids[u]`` likewise. ``sequences[u]`` holds
    user ``u``'s dense item indices in chronological order; ``train = seq[:-2]``, ``valid = seq[-2]``,
    ``test = seq[-1]``.

    Under a cold protocol (:func:`apply_protocol`) training sees only items ``0 .. num_train_items - 1`` (the
    others are new: no id vector, never a target or a negative) and no user of ``cold_users``; what is scored is
    ``cases[which]`` instead of every user's held-out item.
    """

    user_ids: list
    item_ids: list
    sequences: list[np.ndarray]
    protocol: str = "warm"
    trained_items: int | None = None  # None: every item
    cold_users: frozenset = frozenset()
    cases: dict = field(default_factory=dict, compare=False, repr=False)  # "valid"/"test" -> list[Case]

    @property
    def num_items(self) -> int:
        return len(self.item_ids)

    @property
    def num_users(self) -> int:
        return len(self.user_ids)

    @property
    def num_train_items(self) -> int:
        """Items training may see: dense indices below this (the rest are new items, cold-items)."""
        return self.num_items if self.trained_items is None else self.trained_items

    def train_seq(self, u: int, through_valid: bool = False) -> np.ndarray:
        """User ``u``'s training items, in order; ``through_valid``: the validation item too (the refit)."""
        seq = self.sequences[u]
        if u in self.cold_users:
            return seq[:0]
        train = seq[:-1] if through_valid else seq[:-2]
        if self.trained_items is not None:
            train = train[train < self.trained_items]
        return train

    def valid_target(self, u: int) -> int:
        return int(self.sequences[u][-2])

    def test_target(self, u: int) -> int:
        return int(self.sequences[u][-1])

    def num_interactions(self) -> int:
        return int(sum(len(s) for s in self.sequences))

    def num_cases(self, which: Literal["valid", "test"]) -> int:
        """How many targets ``which`` scores: every user (warm), or the protocol's cases."""
        return self.num_users if self.protocol == "warm" else len(self.cases[which])

    def case_user(self, i: int, which: Literal["valid", "test"]) -> int:
        """The split user of case ``i`` (user ``i`` itself under warm)."""
        return i if self.protocol == "warm" else self.cases[which][i].user


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


def split_catalog(config: Config, catalog: Catalog, protocol: str | None = None) -> Split:
    """The leave-one-out split of a catalog, with the tie-break the config (or the catalog) asks for, under the
    config's ``data.protocol`` (or ``protocol``)."""
    tie_break = config.data.tie_break
    if tie_break == "auto":
        tie_break = catalog.meta.get("tie_break", "item_id")
    split = leave_one_out(catalog.interactions, config.data.min_count, tie_break)
    return apply_protocol(split, protocol or config.data.protocol, config.data.cold_share, config.data.cold_seed)


def apply_protocol(split: Split, protocol: str, share: float = 0.1, seed: int = 0) -> Split:
    """``split`` under ``protocol`` (see the module docstring); the draw depends only on ``seed`` and the split.

    Items training never sees get the last dense indices (so id-table rows stay ``0 .. num_train_items - 1``):
    under cold-items the drawn ones, under cold-users any item that only cold users interacted with."""
    if protocol not in PROTOCOLS:
        raise CatalogError(f"unknown protocol {protocol!r}; choose one of {PROTOCOLS}")
    if protocol == "warm":
        return split
    rng = np.random.default_rng(seed)
    if protocol == "cold-items":
        drawn = rng.choice(split.num_items, size=max(1, round(share * split.num_items)), replace=False)
        split = _new_items_last(split, np.isin(np.arange(split.num_items), drawn))
        cases = {}
        for which, back in (("valid", 2), ("test", 1)):
            cases[which] = [Case(u, int(seq[-back]), seq[:-back]) for u, seq in enumerate(split.sequences)
                            if seq[-back] >= split.trained_items]
        logger.info("cold-items: %d of %d items never trained on; %d validation and %d test users have one as "
                    "their target", split.num_items - split.trained_items, split.num_items, len(cases["valid"]),
                    len(cases["test"]))
        return replace(split, protocol=protocol, cases=cases)
    n = max(1, round(share * split.num_users))
    if 2 * n >= split.num_users:
        raise CatalogError(f"cold-users: {split.num_users} users leave none to train on at data.cold_share {share}")
    order = rng.permutation(split.num_users)
    held = {"valid": sorted(order[:n].tolist()), "test": sorted(order[n:2 * n].tolist())}
    cold = frozenset(held["valid"] + held["test"])
    seen = np.zeros(split.num_items, dtype=bool)
    for u, seq in enumerate(split.sequences):
        if u not in cold:
            seen[seq[:-1]] = True  # what training or the refit may read
    split = _new_items_last(replace(split, cold_users=cold), ~seen)
    cases = {which: [Case(u, int(split.sequences[u][k]), split.sequences[u][:k], k) for u in users
                     for k in COLD_USER_ITEMS if len(split.sequences[u]) > k] for which, users in held.items()}
    logger.info("cold-users: %d validation and %d test users never trained on, scored from their first %s items "
                "(%d and %d targets); %d items only they interacted with", n, n, "/".join(map(str, COLD_USER_ITEMS)),
                len(cases["valid"]), len(cases["test"]), split.num_items - split.trained_items)
    return replace(split, protocol=protocol, cases=cases)


def _new_items_last(split: Split, new: np.ndarray) -> Split:
    """``split`` with the items flagged ``new`` moved to the last dense indices, each part in id order."""
    order = np.concatenate([np.flatnonzero(~new), np.flatnonzero(new)])
    position = np.empty_like(order)
    position[order] = np.arange(len(order))
    return replace(split, item_ids=[split.item_ids[j] for j in order], trained_items=int((~new).sum()),
                   sequences=[position[s] for s in split.sequences])


def held_out(split: Split, u: int, which: Literal["valid", "test"]) -> tuple[int, np.ndarray, np.ndarray]:
    """``(target, history, exclude)`` of user ``u`` for the validation or the test target (under a cold
    protocol: of case ``u``, see :meth:`Split.num_cases`).

    ``history`` is what the user tower reads (every item before the target, in order). ``exclude`` is what is
    removed from the ranking: the history, minus the target itself should the user have seen it before (a
    re-watch still has to be ranked). Both the training loop and the served evaluation use this.
    """
    if split.protocol != "warm":
        case = split.cases[which][u]
        return case.target, case.history, case.history[case.history != case.target]
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

    An item's popularity is its number of training interactions before the ranked target, over all users (what
    the models read then: for the test target the validation items count too). Ties go to the lower item index.
    """
    counts = torch.zeros(split.num_items, dtype=torch.float64)
    for u in range(split.num_users):
        history = split.train_seq(u, through_valid=which == "test")
        counts.index_add_(0, torch.as_tensor(np.asarray(history, dtype=np.int64)), torch.ones(len(history),
                                                                                              dtype=torch.float64))
    # Scores strictly decrease along (count desc, index asc), so no two items tie.
    order = torch.argsort(-counts, stable=True)  # most popular first; equal counts keep the index order
    scores = torch.empty(split.num_items, dtype=torch.float32)
    scores[order] = -torch.arange(split.num_items, dtype=torch.float32)
    ranks, tops = [], []
    n = split.num_cases(which)
    for start in range(0, n, 1024):
        held = [held_out(split, u, which) for u in range(start, min(n, start + 1024))]
        batch = scores[None].expand(len(held), -1)
        ranks.append(target_ranks(batch, torch.tensor([t for t, _, _ in held]), [ex for _, _, ex in held]))
        tops.append(top_items(batch, [ex for _, _, ex in held], COLD_SHARE_AT))
    return protocol_metrics(split, which, torch.cat(ranks), torch.cat(tops))


COLD_SHARE_AT = 10  # cold-items report the share of new items in the top 10


def top_items(scores: torch.Tensor, exclude: Sequence[Sequence[int]], k: int) -> torch.Tensor:
    """``(U, k)`` indices of each row's ``k`` best items, ``exclude`` (each row's history) removed."""
    masked = scores.float().clone()
    for u, items in enumerate(exclude):
        if len(items):
            masked[u, torch.as_tensor(np.asarray(items), dtype=torch.long, device=scores.device)] = float("-inf")
    return masked.topk(min(k, masked.shape[1]), dim=1).indices.cpu()


def protocol_metrics(split: Split, which: Literal["valid", "test"], ranks: torch.Tensor | Sequence[int],
                     top: torch.Tensor | None = None, cases: Sequence[int] | None = None,
                     ks: Sequence[int] = (5, 10, 20)) -> dict:
    """:func:`ranking_metrics` of the ranks of ``cases`` (default: every ``which`` case, in order), plus what the
    protocol reports: ``users`` (how many targets were scored), ``cold_share@10`` under cold-items (the share of
    new items among the top 10 split indices in ``top``), and ``by_history`` under cold-users (the metrics for each
    number of first items the history held)."""
    ranks = torch.as_tensor(ranks)
    out: dict = ranking_metrics(ranks, ks)
    out["users"] = len(ranks)
    if split.protocol == "cold-items" and top is not None:
        out[f"cold_share@{COLD_SHARE_AT}"] = float((top[:, :COLD_SHARE_AT] >= split.num_train_items).double().mean())
    if split.protocol == "cold-users":
        cases = range(len(ranks)) if cases is None else cases
        first = np.array([split.cases[which][i].first for i in cases])
        out["by_history"] = {str(k): {**ranking_metrics(ranks[torch.as_tensor(first == k)], ks),
                                      "users": int((first == k).sum())} for k in COLD_USER_ITEMS}
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
