"""The query API: ``Recommender.load(run_dir).recommend(user_id=..., k=10)``.

A query builds the user's profile prompt, embeds it with the user tower, retrieves candidates from the live
FAISS index (already-seen items excluded), and optionally reranks the top candidates with the LLM.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import faiss
import numpy as np
import polars as pl
import torch

from index.store import live_version, read_version
from towers.factory import TwoTower, item_fingerprint, load_towers
from towers.hub import load_tokenizer
from towers.user import pad_batch
from train.loop import profile_builder, resolve_device

logger = logging.getLogger(__name__)


class QueryError(ValueError):
    """A query that cannot be answered: unknown user or item id, empty history, bad k."""


@dataclass(frozen=True)
class Recommendation:
    item_id: object
    title: str
    score: float  # final score (after rerank when it ran)
    retrieval_score: float  # cosine similarity from the two towers
    rerank_score: float | None = None  # LLM yes/no log-odds, when reranked


class Recommender:
    """Serves top-k recommendations from a run directory's live index."""

    def __init__(self, run_dir: Path, model: TwoTower, index: faiss.Index, items: pl.DataFrame,
                 histories: dict, device: torch.device, version: Path):
        self.run_dir, self.model, self.index, self.items, self.device = run_dir, model, index, items, device
        self.version = version
        self.config = model.config
        self.histories = histories
        self.item_ids = items["item_id"].to_list()
        self.titles = items["title"].to_list()
        self.faiss_ids = items["faiss_id"].to_numpy()
        self.row_of = {item_id: r for r, item_id in enumerate(self.item_ids)}
        self.row_of_faiss = {int(f): r for r, f in enumerate(self.faiss_ids)}
        self.int_ids = items["item_id"].dtype.is_integer()
        self.tokenizer = load_tokenizer(self.config.user.model)
        self.builder = profile_builder(self.config, items, self.tokenizer)
        self._reranker = None

    @classmethod
    def load(cls, run_dir: str | Path, device: str = "auto", version: str | None = None) -> Recommender:
        """Load towers, the live (or named) index version and the users' histories from ``run_dir``."""
        run_dir = Path(run_dir)
        dev = resolve_device(device)
        model = load_towers(run_dir, dev)
        folder = run_dir / "index" / version if version else live_version(run_dir / "index")
        index, items, _ = read_version(folder, item_fingerprint(model), model.config.dim)
        hist = pl.read_parquet(run_dir / "histories.parquet").sort(["user_id", "position"])
        grouped = hist.group_by("user_id", maintain_order=True).agg(pl.col("item_id"))
        histories = dict(zip(grouped["user_id"].to_list(), grouped["item_id"].to_list()))
        return cls(run_dir, model, index, items, histories, dev, folder)

    @property
    def reranker(self):
        if self._reranker is None:
            from towers.rerank import LLMReranker

            ref = self.config.rerank.model or self.config.user.model
            self._reranker = LLMReranker(self.config.rerank, ref, self.tokenizer).to(self.device)
        return self._reranker

    # -- id handling ---------------------------------------------------------------------------------------
    def _key(self, item_id):
        if item_id in self.row_of:
            return item_id
        try:  # "42" for an integer catalog, 42 for a string one
            alt = int(item_id) if self.int_ids else str(item_id)
        except (TypeError, ValueError):
            alt = None
        if alt in self.row_of:
            return alt
        raise QueryError(f"unknown item_id {item_id!r}: not in the catalog of index {self.version.name}")

    def _rows(self, item_ids: Iterable) -> list[int]:
        """Index-table rows of item ids (a clear error for any unknown id)."""
        return [self.row_of[self._key(i)] for i in item_ids]

    def history_of(self, user_id) -> list:
        """The user's known history (item ids, oldest first)."""
        for key in (user_id, _try_int(user_id), str(user_id)):
            if key in self.histories:
                return list(self.histories[key])
        raise QueryError(f"unknown user_id {user_id!r}; pass history=[item ids] for a new user")

    # -- queries -------------------------------------------------------------------------------------------
    @torch.inference_mode()
    def embed_histories(self, histories: Sequence[Sequence]) -> np.ndarray:
        """``(B, D)`` user embeddings for chronological histories of item ids."""
        prompts = []
        for h in histories:
            if len(h) == 0:
                raise QueryError("empty history: give at least one item id")
            prompts.append(self.builder.build(self._rows(h)).input_ids)
        out = []
        bs = self.config.user.batch_size
        for start in range(0, len(prompts), bs):
            ids, mask = pad_batch(prompts[start:start + bs], self.tokenizer.pad_token_id)
            emb = self.model.user.encode_users(ids.to(self.device), mask.to(self.device), len(self.builder.header_ids))
            out.append(emb.float().cpu().numpy())
        return np.concatenate(out)

    def recommend(self, user_id=None, history: Sequence | None = None, k: int = 10, rerank: bool | None = None,
                  exclude_seen: bool = True, allowed: Iterable | None = None) -> list[Recommendation]:
        """Top-``k`` for a known user (``user_id``) or a new one (``history``, oldest first).

        Items in the history are excluded unless ``exclude_seen=False``. ``allowed`` restricts results to
        the given item ids. ``rerank`` defaults to the config's ``rerank.enabled``.
        """
        if (user_id is None) == (history is None):
            raise QueryError("give exactly one of user_id or history")
        return self.recommend_batch(
            user_ids=None if user_id is None else [user_id], histories=None if history is None else [history],
            k=k, rerank=rerank, exclude_seen=exclude_seen, allowed=allowed,
        )[0]

    def recommend_batch(self, user_ids: Sequence | None = None, histories: Sequence[Sequence] | None = None,
                        k: int = 10, rerank: bool | None = None, exclude_seen: bool = True,
                        allowed: Iterable | None = None) -> list[list[Recommendation]]:
        """Batch form of :meth:`recommend`: one result list per user or history."""
        if k < 1:
            raise QueryError(f"k must be at least 1, got {k}")
        if (user_ids is None) == (histories is None):
            raise QueryError("give exactly one of user_ids or histories")
        if histories is None:
            histories = [self.history_of(u) for u in user_ids]
        rerank = self.config.rerank.enabled if rerank is None else rerank
        users = self.embed_histories(histories)
        n_cand = max(k, self.config.rerank.candidates) if rerank else k
        seen = [set(self._rows(h)) if exclude_seen else set() for h in histories]
        candidates = self._search(users, n_cand, seen, allowed)
        results = []
        for h, (rows, scores) in zip(histories, candidates):
            recs = [Recommendation(self.item_ids[r], self.titles[r], float(s), float(s)) for r, s in zip(rows, scores)]
            results.append(self.rerank(h, recs, k) if rerank else recs[:k])
        return results

    def rerank(self, history: Sequence, candidates: list[Recommendation], k: int | None = None) -> list[Recommendation]:
        """Reorder retrieved candidates with the LLM reranker given the user's history; returns the top ``k``."""
        k = len(candidates) if k is None else k
        if len(candidates) < 2:
            return candidates[:k]
        prompt = self.builder.build(self._rows(history)).input_ids
        llm = self.reranker.log_odds(prompt, [c.title for c in candidates])
        retrieval = torch.tensor([c.retrieval_score for c in candidates])
        final = self.reranker.combine(retrieval, llm)
        order = torch.argsort(final, descending=True, stable=True).tolist()[:k]
        return [Recommendation(candidates[o].item_id, candidates[o].title, float(final[o]),
                               candidates[o].retrieval_score, float(llm[o])) for o in order]

    def _search(self, users: np.ndarray, n: int, seen: list[set], allowed: Iterable | None):
        """Top-``n`` (rows, scores) per user, with seen rows removed; over-fetches by the largest history."""
        params = None
        if allowed is not None:
            allowed_ids = self.faiss_ids[self._rows(allowed)].astype(np.int64)
            params = faiss.SearchParameters(sel=faiss.IDSelectorBatch(allowed_ids))
        fetch = min(self.index.ntotal, n + max((len(s) for s in seen), default=0))
        scores, ids = self.index.search(np.ascontiguousarray(users, dtype=np.float32), fetch, params=params)
        out = []
        for u in range(len(users)):
            rows, vals = [], []
            for f, s in zip(ids[u], scores[u]):
                if f < 0:
                    continue
                r = self.row_of_faiss[int(f)]
                if r in seen[u]:
                    continue
                rows.append(r)
                vals.append(float(s))
                if len(rows) == n:
                    break
            out.append((rows, np.asarray(vals, dtype=np.float32)))
        return out


def _try_int(x):
    try:
        return int(x)
    except (TypeError, ValueError):
        return x
