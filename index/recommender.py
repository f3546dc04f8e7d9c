"""The query API: ``Recommender.load(run_dir).recommend(user_id=..., k=10)``.

A query builds the user's profile prompt, embeds it with the user tower, retrieves candidates from the live
FAISS index (already-seen items excluded), and optionally reranks the top candidates with the LLM.
"""

from __future__ import annotations

import logging
import numbers
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import faiss
import numpy as np
import polars as pl
import torch

from data.ids import ItemSpace
from data.items import pad_batch
from data.profiles import profile_builder
from data.rundir import RunDir
from errors import QueryError
from index.store import live_version, read_vectors, read_version
from towers.device import resolve_device
from towers.factory import TwoTower, item_fingerprint, load_towers
from towers.hub import load_tokenizer
from towers.sequence import title_table

logger = logging.getLogger(__name__)


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
                 histories: dict, device: torch.device, version: Path, vectors: np.ndarray | None = None,
                 id_table: ItemSpace | None = None):
        self.run_dir, self.model, self.index, self.items, self.device = run_dir, model, index, items, device
        self.version = version
        self.config = model.config
        self.histories = histories
        self.item_ids = items["item_id"].to_list()
        self.titles = items["title"].to_list()
        self.faiss_ids = items["faiss_id"].to_numpy()
        self.index_items = ItemSpace(self.item_ids, f"index {version.name}")  # item id -> index-table row
        self.faiss_rows = ItemSpace(self.faiss_ids.tolist(), "faiss ids")  # faiss id -> index-table row
        self.int_ids = items["item_id"].dtype.is_integer()
        self.tokenizer = load_tokenizer(self.config.user.model)
        self.builder = profile_builder(self.config, items, self.tokenizer)
        self._reranker = None
        # Item-sequence user tower: history items are read as their item embeddings (kept beside the index)
        # and, for an own input table, their id-table rows (-1 for items without one).
        self.vectors = vectors
        self.id_rows = self.index_items.to(id_table) if id_table is not None else None
        self.title_vectors = title_table(model, self.titles) if vectors is not None else None  # (N, H) or None

    @classmethod
    def load(cls, run_dir: str | Path, device: str = "auto", version: str | None = None) -> Recommender:
        """Load towers, the live (or named) index version and the users' histories from ``run_dir``.

        The run is self-contained: the training catalog is not read. Where it is still at its recorded path
        but its content changed since training, a warning says so (the served histories are the ones the run
        was trained on); ``evaluate`` refuses such a catalog outright.
        """
        run = RunDir(run_dir).require()
        dev = resolve_device(device)
        model = load_towers(run, dev)
        folder = run.index_root / version if version else live_version(run.index_root)
        index, items, manifest = read_version(folder, item_fingerprint(model), model.config.dim)
        vectors = id_table = None
        if model.config.user.input == "items":
            vectors = read_vectors(folder, manifest)
            id_table = run.read_id_table()
        if run.catalog_changed():
            logger.warning("the catalog %s changed since run %s was trained; serving the run's own histories "
                           "(retrain to learn from the new data)", run.catalog_ref()["path"], run.path)
        return cls(run.path, model, index, items, run.read_histories(), dev, folder, vectors, id_table)

    @property
    def reranker(self):
        if self._reranker is None:
            from towers.rerank import LLMReranker

            ref = self.config.rerank.model or self.config.user.model
            self._reranker = LLMReranker(self.config.rerank, ref, self.tokenizer).to(self.device)
        return self._reranker

    # -- id handling ---------------------------------------------------------------------------------------
    def _key(self, item_id, where: str = ""):
        """The catalog's own form of an item id: ``"42"`` finds integer item 42, ``42`` finds string item "42".

        Only ints and strings are ids: ``True``, ``50.7`` or ``None`` are refused rather than coerced.
        """
        _check_id_type(item_id, f"item_id in {where}" if where else "item_id")
        if item_id in self.index_items:
            return item_id
        alt = _as_int(item_id) if self.int_ids else str(item_id)
        if alt is not None and alt in self.index_items:
            return alt
        where = f" in {where}" if where else ""
        raise QueryError(f"unknown item_id {item_id!r}{where}: not in the catalog of index {self.version.name}")

    def _rows(self, item_ids: Iterable, where: str = "") -> list[int]:
        """Index-table rows of item ids (a clear error for any unknown or mistyped id)."""
        return [self.index_items.row(self._key(i, where)) for i in _id_list(item_ids, where or "item ids")]

    def history_of(self, user_id) -> list:
        """The user's known history (item ids, oldest first)."""
        _check_id_type(user_id, "user_id")
        for key in (user_id, _as_int(user_id), str(user_id)):
            if key is not None and key in self.histories:
                return list(self.histories[key])
        raise QueryError(f"unknown user_id {user_id!r}; pass history=[item ids] for a new user")

    # -- queries -------------------------------------------------------------------------------------------
    @torch.inference_mode()
    def embed_histories(self, histories: Sequence[Sequence]) -> np.ndarray:
        """``(B, D)`` user embeddings for chronological histories of item ids."""
        rows_of = []
        for h in histories:
            rows = self._rows(h, "history")
            if not rows:
                raise QueryError("empty history: give at least one item id")
            rows_of.append(rows)
        if self.vectors is not None:
            return self._embed_item_sequences(rows_of)
        prompts = [self.builder.build(rows).input_ids for rows in rows_of]
        out = []
        bs = self.config.user.batch_size
        for start in range(0, len(prompts), bs):
            ids, mask = pad_batch(prompts[start:start + bs], self.tokenizer.pad_token_id)
            emb = self.model.user.encode_users(ids.to(self.device), mask.to(self.device), len(self.builder.header_ids))
            out.append(emb.float().cpu().numpy())
        return np.concatenate(out)

    def _embed_item_sequences(self, rows_of: list[list[int]]) -> np.ndarray:
        """``(B, D)`` embeddings from histories given as index rows (the item-sequence user tower).

        Each history keeps its ``user.max_len`` most recent items, right-padded, exactly as in training.
        """
        max_len, dim = self.config.user.max_len, self.config.dim
        use_table = getattr(self.model.user, "table", None) is not None
        out = []
        for start in range(0, len(rows_of), 256):
            chunk = [np.asarray(r[-max_len:], dtype=np.int64) for r in rows_of[start:start + 256]]
            width = max(len(r) for r in chunk)
            x = np.zeros((len(chunk), width, dim), dtype=np.float32)  # (B, T, D)
            mask = np.zeros((len(chunk), width), dtype=np.int64)
            id_rows = np.full((len(chunk), width), -1, dtype=np.int64)
            for i, r in enumerate(chunk):
                x[i, : len(r)] = self.vectors[r]
                mask[i, : len(r)] = 1
                if self.id_rows is not None:
                    id_rows[i, : len(r)] = self.id_rows[r]
            titles = None
            if self.title_vectors is not None:  # padding positions read row 0: masked out anyway
                rows = torch.zeros(len(chunk), width, dtype=torch.long)
                for i, r in enumerate(chunk):
                    rows[i, : len(r)] = torch.from_numpy(r)
                titles = self.title_vectors[rows.to(self.title_vectors.device)]
            emb = self.model.user.encode_users(
                torch.from_numpy(x).to(self.device), torch.from_numpy(mask).to(self.device),
                torch.from_numpy(id_rows).to(self.device) if use_table else None, titles)
            out.append(emb.float().cpu().numpy())
        return np.concatenate(out)

    def recommend(self, user_id=None, history: Sequence | None = None, k: int = 10, rerank: bool | None = None,
                  exclude_seen: bool = True, allowed: Iterable | None = None,
                  exclude: Iterable | None = None) -> list[Recommendation]:
        """Top-``k`` for a known user (``user_id``) or a new one (``history``: a list of item ids, oldest first).

        Items in the history are excluded unless ``exclude_seen=False``; ``exclude`` removes further item ids.
        ``allowed`` restricts results to the given item ids. ``rerank`` defaults to the config's
        ``rerank.enabled``.
        """
        if user_id is None and history is None:
            raise QueryError("give a user_id (a known user) or a history (item ids, oldest first)")
        if user_id is not None and history is not None:
            raise QueryError("give either user_id or history, not both")
        return self.recommend_batch(
            user_ids=None if user_id is None else [user_id], histories=None if history is None else [history],
            k=k, rerank=rerank, exclude_seen=exclude_seen, allowed=allowed,
            exclude=None if exclude is None else [exclude],
        )[0]

    def recommend_batch(self, user_ids: Sequence | None = None, histories: Sequence[Sequence] | None = None,
                        k: int = 10, rerank: bool | None = None, exclude_seen: bool = True,
                        allowed: Iterable | None = None,
                        exclude: Sequence[Iterable] | None = None) -> list[list[Recommendation]]:
        """Batch form of :meth:`recommend`: one result list per user or history (``exclude``: one per user)."""
        if isinstance(k, bool) or not isinstance(k, numbers.Integral):
            raise QueryError(f"k must be an integer, got {type(k).__name__} {k!r}")
        if k < 1:
            raise QueryError(f"k must be at least 1, got {k}")
        if (user_ids is None) == (histories is None):
            raise QueryError("give exactly one of user_ids or histories")
        if histories is None:
            user_ids = _id_list(user_ids, "user_ids")
            if not user_ids:
                raise QueryError("user_ids is empty: give at least one user id")
            histories = [self.history_of(u) for u in user_ids]
        else:
            if isinstance(histories, (str, bytes)) or not isinstance(histories, Sequence):
                raise QueryError(f"histories must be a list of histories, got {type(histories).__name__}")
            if not histories:
                raise QueryError("histories is empty: give at least one history")
            histories = [_id_list(h, "history") for h in histories]
        if exclude is not None and len(exclude) != len(histories):
            raise QueryError(f"exclude has {len(exclude)} entries for {len(histories)} users")
        rerank = self.config.rerank.enabled if rerank is None else bool(rerank)
        users = self.embed_histories(histories)
        n_cand = max(k, self.config.rerank.candidates) if rerank else k
        seen = [set(self._rows(h)) if exclude_seen else set() for h in histories]
        if exclude is not None:
            seen = [s | set(self._rows(ex, "exclude")) for s, ex in zip(seen, exclude)]
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
            allowed_ids = self.faiss_ids[self._rows(allowed, "allowed")].astype(np.int64)
            params = faiss.SearchParameters(sel=faiss.IDSelectorBatch(allowed_ids))
        fetch = min(self.index.ntotal, n + max((len(s) for s in seen), default=0))
        scores, ids = self.index.search(np.ascontiguousarray(users, dtype=np.float32), fetch, params=params)
        out = []
        for u in range(len(users)):
            rows, vals = [], []
            for f, s in zip(ids[u], scores[u]):
                if f < 0:
                    continue
                r = self.faiss_rows.row(int(f))
                if r in seen[u]:
                    continue
                rows.append(r)
                vals.append(float(s))
                if len(rows) == n:
                    break
            out.append((rows, np.asarray(vals, dtype=np.float32)))
        return out


def _check_id_type(value, what: str) -> None:
    """Ids are ints or strings; bools, floats and anything else are refused, never coerced."""
    if isinstance(value, bool) or not isinstance(value, (str, numbers.Integral)):
        raise QueryError(f"{what} {value!r} has type {type(value).__name__}; ids are integers or strings")


def _as_int(value) -> int | None:
    """``value`` as an int if it is an int or a canonical integer string (``"42"``, not ``"042"`` or ``"4.0"``)."""
    if isinstance(value, numbers.Integral):
        return int(value)
    text = str(value).strip()
    if text.lstrip("-").isdigit() and str(int(text)) == text:
        return int(text)
    return None


def _id_list(ids, what: str) -> list:
    """A list of ids from a list/tuple/array; a bare string (``"12"``) is refused, not read as ``["1", "2"]``."""
    if isinstance(ids, (str, bytes)) or not isinstance(ids, Iterable):
        raise QueryError(f"{what} must be a list of ids, got {type(ids).__name__} {ids!r}")
    return list(ids.tolist() if isinstance(ids, np.ndarray) else ids)
