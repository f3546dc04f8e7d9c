"""Retrieval: ``Recommender.load(run_dir).recommend(user_id=..., k=10)``.

A query embeds the user's history with the user tower and searches the live FAISS index (already-seen items
excluded, filters applied). The LLM stages above retrieval (rerank, reasons) are :class:`rerank.Pipeline`'s,
which composes them over a Recommender; this module never imports them.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterable, Sequence
from pathlib import Path

import faiss
import numpy as np
import polars as pl
import torch

from data.ids import ItemSpace, as_int
from data.items import pad_batch
from data.profiles import profile_builder
from data.rundir import RunDir
from errors import IndexStateError, QueryError
from index import ann
from index.results import (  # noqa: F401 (MAX_K, Recommendation, Results and Hits are this module's API too)
    MAX_K,
    Hits,
    Recommendation,
    Results,
    Retrieved,
    allow_hints,
    check_id_type,
    check_k,
    id_list,
    one_query,
    retrieval_only,
)
from index.store import is_version_name, live_version, read_vectors, read_version
from index.tuning import autotune, read_tuning, write_tuning
from index.where import where_mask
from towers.device import resolve_device
from towers.factory import TwoTower, item_fingerprint, load_towers
from towers.hub import load_tokenizer
from towers.sequence import ProfilePrefixes, title_table

logger = logging.getLogger(__name__)

EMBED_BATCH = 256  # histories per user-tower pass when embedding item sequences
WHERE_CACHE = 64  # SQL `where` masks kept per recommender (the oldest goes first)


class Recommender:
    """Serves top-k recommendations from a run directory's live index."""

    def __init__(self, run_dir: Path, model: TwoTower, index: faiss.Index, items: pl.DataFrame,
                 histories: dict, device: torch.device, version: Path, vectors: np.ndarray | None = None,
                 id_table: ItemSpace | None = None, search_device: str = "cpu"):
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
        # Item-sequence user tower: history items are read as their item embeddings (kept beside the index)
        # and, for an own input table, their id-table rows (-1 for items without one).
        self.vectors = vectors
        self.id_rows = self.index_items.to(id_table) if id_table is not None else None
        self.title_vectors = title_table(model, self.titles) if vectors is not None else None  # (N, H) or None
        self._lock = threading.Lock()
        self._init_search(search_device)

    @classmethod
    def load(cls, run_dir: str | Path, device: str = "auto", version: str | None = None,
             search_device: str | None = None) -> Recommender:
        """Load towers, the live (or named) index version and the users' histories from ``run_dir``.

        ``search_device``: ``"cpu"`` (faiss) or ``"gpu"`` (faiss's GPU index where faiss sees GPUs, else exact
        search in torch on CUDA; never the CPU); default: ``"gpu"`` when the towers run on CUDA, else ``"cpu"``.
        The log (INFO) says which path runs. An approximate index searches with the parameters auto-tuned for
        ``index.target_recall`` (recorded in the version's ``search.json``; tuned on first load if absent).

        The run is self-contained: the training catalog is not read. Where it is still at its recorded path
        but its content changed since training, a warning says so (the served histories are the ones the run
        was trained on); ``evaluate`` refuses such a catalog outright.
        """
        run = RunDir(run_dir).require()
        if version is not None and not is_version_name(version):  # before any model loads
            raise IndexStateError(f"version {version!r} is not an index version name: it must name a folder "
                                  f"directly inside {run.index_root}")
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
        search_device = search_device or ("gpu" if dev.type == "cuda" else "cpu")
        return cls(run.path, model, index, items, run.read_histories(), dev, folder, vectors, id_table,
                   search_device)

    # -- id handling ---------------------------------------------------------------------------------------
    def _key(self, item_id, where: str = ""):
        """The catalog's own form of an item id: ``"42"`` finds integer item 42, ``42`` finds string item "42".

        Only ints and strings are ids: ``True``, ``50.7`` or ``None`` are refused rather than coerced.
        """
        check_id_type(item_id, f"item_id in {where}" if where else "item_id")
        if item_id in self.index_items:
            return item_id
        alt = as_int(item_id) if self.int_ids else str(item_id)
        if alt is not None and alt in self.index_items:
            return alt
        where = f" in {where}" if where else ""
        raise QueryError(f"unknown item_id {item_id!r}{where}: not in the catalog of index {self.version.name}")

    def _rows(self, item_ids: Iterable, where: str = "") -> list[int]:
        """Index-table rows of item ids (a clear error for any unknown or mistyped id)."""
        ids = id_list(item_ids, where or "item ids")
        if all(type(i) is int or type(i) is str for i in ids):  # the common case, one dict lookup each
            rows = self.index_items.rows(ids)
            if len(rows) == 0 or rows.min() >= 0:
                return rows.tolist()
        return [self.index_items.row(self._key(i, where)) for i in ids]

    def history_of(self, user_id) -> list:
        """The user's known history (item ids, oldest first)."""
        check_id_type(user_id, "user_id")
        for key in (user_id, as_int(user_id), str(user_id)):
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
        prefixes = None  # user.profile_prefix: the profile state of what is older than the last max_len items
        if getattr(self.model.user, "profile", None) is not None:
            prefixes = ProfilePrefixes(self.model, self.builder, self.tokenizer.pad_token_id,
                                       self.config.user.batch_size)
        out = []
        for start in range(0, len(rows_of), EMBED_BATCH):
            chunk = [np.asarray(r[-max_len:], dtype=np.int64) for r in rows_of[start:start + EMBED_BATCH]]
            prefix = None if prefixes is None else prefixes([r[:-max_len] for r in rows_of[start:start + EMBED_BATCH]])
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
                torch.from_numpy(id_rows).to(self.device) if use_table else None, titles, prefix)
            out.append(emb.float().cpu().numpy())
        return np.concatenate(out)

    def recommend(self, user_id=None, history: Sequence | None = None, k: int = 10, rerank: bool | None = None,
                  exclude: Iterable | None = None, allow: Iterable | None = None, deny: Iterable | None = None,
                  where: str | pl.Expr | None = None, explain: bool = False) -> Results:
        """Top-``k`` for a known user (``user_id``) or a new one (``history``: a list of item ids, oldest first).

        Args:
            k: 1 to 1,000 items.
            exclude: item ids to leave out besides the history (which is always left out).
            allow: only these item ids may be recommended.
            deny: these item ids are never recommended.
            where: a condition on the items table's columns, as a polars expression (``pl.col("year") > 1990``)
                or SQL text (``"year > 1990 AND genres LIKE '%Drama%'"``); items where it is null do not pass.
                SQL text may use only the item columns, literals, comparisons, AND/OR/NOT, IN lists, LIKE, IS NULL,
                BETWEEN, arithmetic and a few scalar functions (:mod:`index.where`); anything else, such as a
                subquery or a table function, is a :class:`QueryError`.
            rerank, explain: the LLM stages are :class:`rerank.Pipeline`'s (``Pipeline.load(run).recommend(...,
                rerank=True, explain=True)``). Here only ``None``/``False`` are accepted, for code written for
                both; asking for either stage is a :class:`QueryError` that names the pipeline.

        Returns a :class:`Results`: a list of :class:`Recommendation` (best first; fewer than ``k`` only when
        fewer items pass the filters) that also carries ``.version`` and ``.latency_ms``, and ``.hint`` where
        ``allow`` items were left out as already seen (also logged as a WARNING).
        """
        started = time.perf_counter()
        retrieval_only(rerank, explain)
        user_ids, histories = one_query(user_id, history)
        found = self.retrieve(user_ids, histories, k, k, None if exclude is None else [exclude], allow, deny, where)
        return self.answer(found, found.lists, k, started)[0]

    def recommend_batch(self, user_ids: Sequence | None = None, histories: Sequence[Sequence] | None = None,
                        k: int = 10, rerank: bool | None = None, allow: Iterable | None = None,
                        deny: Iterable | None = None, where: str | pl.Expr | None = None,
                        explain: bool = False) -> list[Results]:
        """:meth:`recommend` for many users or histories at once (one retrieval, one :class:`Results` each).

        ``allow``, ``deny`` and ``where`` apply to every query. Each result's ``latency_ms`` is the whole
        batch's: that is how long each of its queries waited.
        """
        started = time.perf_counter()
        retrieval_only(rerank, explain)
        found = self.retrieve(user_ids, histories, k, k, None, allow, deny, where)
        return self.answer(found, found.lists, k, started)

    def retrieve(self, user_ids, histories, k: int, depth: int, exclude, allow, deny, where) -> Retrieved:
        """The body of every query: checks, filters, one user-tower pass and one search for ``depth`` (>= ``k``)
        candidates per query. ``exclude``: None or one list of item ids per query. :meth:`answer` finishes it."""
        check_k(k)
        if (user_ids is None) == (histories is None):
            raise QueryError("give exactly one of user_ids or histories")
        if histories is None:
            user_ids = id_list(user_ids, "user_ids")
            if not user_ids:
                raise QueryError("user_ids is empty: give at least one user id")
            histories = [self.history_of(u) for u in user_ids]
        else:
            if isinstance(histories, (str, bytes)) or not isinstance(histories, Sequence):
                raise QueryError(f"histories must be a list of histories, got {type(histories).__name__}")
            if not histories:
                raise QueryError("histories is empty: give at least one history")
            histories = [id_list(h, "history") for h in histories]
        allow = None if allow is None else id_list(allow, "allow")  # read twice: by _keep and for hints
        keep = self._keep(allow, deny, where)  # filters are checked before the (slower) user tower runs
        excluded = [self._rows(h, "history") for h in histories]
        if exclude is not None:
            excluded = [rows + self._rows(ex, "exclude") for rows, ex in zip(excluded, exclude)]
        users = self.embed_histories(histories)
        hits = self._retrieve(users, max(k, depth), excluded, keep, self.knobs)
        return Retrieved(histories, self._lists(hits), allow, keep, excluded)

    def answer(self, found: Retrieved, lists: list[list[Recommendation]], k: int, started: float) -> list[Results]:
        """``lists`` (``found``'s, or reordered from them) cut to ``k``, as :class:`Results` with hints where
        ``allow`` items were left out as already seen."""
        lists = [recs[:k] for recs in lists]
        hints = self._allow_hints(found.allow, found.keep, found.excluded, lists, k,
                                  "already seen (in the history or exclude)")
        latency = (time.perf_counter() - started) * 1e3
        return [Results(recs, self.version.name, latency, hint) for recs, hint in zip(lists, hints)]

    def similar(self, item_id, k: int = 10, allow: Iterable | None = None, deny: Iterable | None = None,
                where: str | pl.Expr | None = None) -> Results:
        """Items like ``item_id``: the nearest items to its item-tower vector (the item itself left out).

        Filters and the result type are those of :meth:`recommend`; ``score`` is the cosine similarity. A retired
        item (one that left the catalog; kept in the version for histories) is searched from the vector the
        version keeps for it, as its histories are: it is never among the results itself.
        """
        started = time.perf_counter()
        check_k(k)
        row = self.index_items.row(self._key(item_id))
        allow = None if allow is None else id_list(allow, "allow")
        keep = self._keep(allow, deny, where)
        hits = self._retrieve(self._vector(row)[None], k, [[row]], keep, self.knobs)
        lists = self._lists(hits)
        hint = self._allow_hints(allow, keep, [[row]], lists, k, "the item itself")[0]
        return Results(lists[0], self.version.name, (time.perf_counter() - started) * 1e3, hint)

    def search_vectors(self, vectors: np.ndarray, k: int = 10, exclude: Sequence[Iterable] | None = None,
                       allow: Iterable | None = None, deny: Iterable | None = None,
                       where: str | pl.Expr | None = None, nprobe: int | None = None,
                       ef_search: int | None = None) -> Hits:
        """Retrieval alone, for query vectors already embedded (``(B, D)`` float32, e.g. from
        :meth:`embed_histories`): the filtered top-``k`` as arrays of index-table rows and scores.

        ``exclude`` holds one list of item ids per query; ``allow``, ``deny`` and ``where`` are as in
        :meth:`recommend`; ``nprobe`` / ``ef_search`` override the index's search parameters for this call.
        Nothing is excluded unless asked (no history here).
        """
        started = time.perf_counter()
        check_k(k)
        q = np.asarray(vectors, dtype=np.float32)
        if q.ndim != 2 or q.shape[1] != self.index.d:
            raise QueryError(f"vectors must have shape (B, {self.index.d}), got {q.shape}")
        if not np.isfinite(q).all():
            raise QueryError("vectors contain NaN or inf")
        if exclude is not None:
            if isinstance(exclude, (str, bytes)) or len(exclude) != len(q):
                raise QueryError(f"exclude needs one list of item ids per query ({len(q)})")
            exclude = [self._rows(ex, "exclude") for ex in exclude]
        keep = self._keep(allow, deny, where)
        knobs = self.knobs
        if nprobe is not None or ef_search is not None:
            knobs = {**knobs, **ann.check_knobs(self.index, {"nprobe": nprobe, "ef_search": ef_search})}
        hits = self._retrieve(q, k, exclude, keep, knobs)
        return Hits(hits.rows, hits.scores, self.version.name, (time.perf_counter() - started) * 1e3)

    def results(self, hits: Hits) -> list[Results]:
        """:class:`Hits` as one :class:`Results` list per query."""
        return [Results(recs, hits.version, hits.latency_ms) for recs in self._lists(hits)]

    def set_search_params(self, nprobe: int | None = None, ef_search: int | None = None,
                          k_factor: int | None = None) -> dict:
        """Set the index's query-time parameters for every later query (IVF ``nprobe``, HNSW ``efSearch``,
        refine ``k_factor``); a parameter the index does not have is a :class:`QueryError`. Returns them all."""
        changes = ann.check_knobs(self.index, {"nprobe": nprobe, "ef_search": ef_search, "k_factor": k_factor})
        self.knobs = {**self.knobs, **changes}  # one assignment: a concurrent query sees the old or new dict
        logger.info("index %s search parameters: %s", self.version.name, self.knobs)
        return dict(self.knobs)

    # -- retrieval internals -------------------------------------------------------------------------------------
    def _init_search(self, search_device: str) -> None:
        """Map the FAISS index's internal ids to items-table rows, pick the search path, apply tuned knobs."""
        inner, id_map = ann.unwrap(self.index)
        self._row_of = self.faiss_rows.rows(id_map)  # (ntotal,) internal id -> items-table row
        if (self._row_of < 0).any():
            raise IndexStateError(f"index {self.version.name}: {int((self._row_of < 0).sum())} vectors have FAISS "
                                  "ids missing from its items table")
        self._internal_of = np.full(len(self.item_ids), -1, dtype=np.int64)  # row -> internal id (-1: not searchable)
        self._internal_of[self._row_of] = np.arange(len(self._row_of))
        self._stored = self.vectors
        path = self.version / RunDir.INDEX_VECTORS
        if self._stored is None and path.is_file():
            stored = np.load(path, mmap_mode="r")
            self._stored = stored if stored.shape == (len(self.item_ids), self.index.d) else None
        self._where_cache: dict[str, np.ndarray] = {}
        self.knobs = ann.knobs_of(inner)
        self._tune(inner)
        exact = None  # the torch GPU path searches the stored vectors (exact even where the index is PQ)
        if search_device == "gpu" and self._stored is not None:
            exact = np.asarray(self._stored[self._row_of], dtype=np.float32)
        self.searcher = ann.make_searcher(inner, search_device, vectors=exact)
        logger.info("index %s: %d items, search on %s%s", self.version.name, self.index.ntotal, self.searcher.name,
                    f" with {self.knobs}" if self.knobs else "")

    def _tune(self, inner: faiss.Index) -> None:
        """Use the version's recorded tuning, or tune now (and record it) for ``index.target_recall``."""
        if not self.knobs:
            return
        target = self.config.index.target_recall
        record = read_tuning(self.version) or {}
        recorded = record.get("knobs")
        if record.get("target_recall") == target and isinstance(recorded, dict) and recorded \
                and set(recorded) <= set(self.knobs):
            self.knobs.update(recorded)
            logger.info("index %s: search parameters %s, auto-tuned for recall@%s %s (measured %s on %s "
                        "held-out queries)", self.version.name, recorded, record.get("k"), target,
                        record.get("heldout_recall"), record.get("heldout"))
            return
        if target <= 0:
            logger.info("index %s: search parameters %s (index.target_recall is 0: not tuned)", self.version.name,
                        self.knobs)
            return
        if self._stored is None:
            logger.warning("index %s has no stored vectors (%s) to tune its search parameters against; using %s",
                           self.version.name, RunDir.INDEX_VECTORS, self.knobs)
            return
        tuning = autotune(inner, np.asarray(self._stored[self._row_of], dtype=np.float32), target,
                              queries=self._tuning_queries(), apply=False)
        self.knobs.update(tuning.knobs)
        try:
            write_tuning(self.version, tuning)
        except OSError as err:
            logger.warning("could not record the tuning in %s (%s); it is used for this process only",
                           self.version, err)

    def _tuning_queries(self, n: int = 1000, seed: int = 0) -> np.ndarray | None:
        """Queries from the real query distribution for :func:`index.tuning.autotune`: the user-tower embeddings of a
        seeded sample of up to ``n`` known users' histories. ``None`` (autotune then samples item vectors) where
        the run has no known users."""
        users = sorted(u for u, h in self.histories.items() if len(h))
        if not users:
            return None
        rng = np.random.default_rng(seed)
        pick = [users[i] for i in rng.permutation(len(users))[:n]]
        t0 = time.perf_counter()
        try:
            with torch.inference_mode():
                queries = self.embed_histories([self.histories[u] for u in pick])
        except QueryError as err:  # a history this version cannot read (should not happen: retired items stay)
            logger.warning("index %s: tuning on item vectors, not users (%s)", self.version.name, err)
            return None
        logger.info("index %s: %d known users' embeddings (%.1f s) are the tuning queries", self.version.name,
                    len(pick), time.perf_counter() - t0)
        return queries

    def _keep(self, allow, deny, where) -> np.ndarray | None:
        """Which indexed items (by internal id) pass ``allow``, ``deny`` and ``where``; ``None``: all of them."""
        if allow is None and deny is None and where is None:
            return None
        keep = np.ones(len(self.item_ids), dtype=bool)
        if allow is not None:
            keep[:] = False
            keep[self._rows(allow, "allow")] = True
        if where is not None:
            keep &= self._where_mask(where)
        if deny is not None:
            keep[self._rows(deny, "deny")] = False
        return keep[self._row_of]

    def _where_mask(self, where: str | pl.Expr) -> np.ndarray:
        """Rows of the items table where the condition holds (null: does not). SQL text is checked against
        :mod:`index.where`'s grammar before polars sees it, so it can read no file; errors never quote item
        values."""
        key = where if isinstance(where, str) else None
        if key is not None and key in self._where_cache:
            return self._where_cache[key]
        mask = where_mask(self.items, where)
        if key is not None:
            if len(self._where_cache) >= WHERE_CACHE:
                self._where_cache.pop(next(iter(self._where_cache)))
            self._where_cache[key] = mask
        return mask

    def _allow_hints(self, allow: list | None, keep: np.ndarray | None, excluded: list[list[int]],
                     lists: list[list[Recommendation]], k: int, what: str) -> list[str | None]:
        """Per query, why its list came out short of ``k`` where ``allow`` explains it (:func:`allow_hints`)."""
        if allow is None or all(len(recs) >= k for recs in lists):
            return [None] * len(lists)
        return allow_hints(self._rows(allow, "allow"), self._internal_of, keep, excluded, lists, k, what)

    def _retrieve(self, users: np.ndarray, k: int, exclude_rows: list | None, keep: np.ndarray | None,
                  knobs: dict) -> Hits:
        """The filtered top-``k`` of ``users (B, D)``: rows and scores, -1 / -inf past a short list's end."""
        exclude = None
        if exclude_rows is not None and any(len(r) for r in exclude_rows):
            exclude = [self._internal_of[np.asarray(r, dtype=np.int64)] for r in exclude_rows]
        scores, labels = self.searcher.search(np.ascontiguousarray(users, dtype=np.float32), k, keep, exclude, knobs)
        rows = np.where(labels >= 0, self._row_of[np.maximum(labels, 0)], -1)
        return Hits(rows, scores, self.version.name, 0.0)

    def _lists(self, hits: Hits) -> list[list[Recommendation]]:
        """One list of :class:`Recommendation` per query of ``hits``."""
        out = []
        for rows, scores in zip(hits.rows.tolist(), hits.scores.tolist()):
            out.append([Recommendation(self.item_ids[r], self.titles[r], s, s) for r, s in zip(rows, scores) if r >= 0])
        return out

    def _vector(self, row: int) -> np.ndarray:
        """The item-tower vector of an items-table row (stored beside the index, else read back from it).

        A retired row (kept for histories, not in the FAISS index) has one only where the version stores its
        vectors (``RunDir.INDEX_VECTORS``, which reindex and build-index write); otherwise it is a QueryError.
        """
        if self._stored is not None:
            return np.asarray(self._stored[row], dtype=np.float32)
        internal = int(self._internal_of[row])
        if internal < 0:
            raise QueryError(f"item {self.item_ids[row]!r} is retired: it left the catalog, and index "
                             f"{self.version.name} has no vector kept for it ({RunDir.INDEX_VECTORS} is missing), "
                             "so there is nothing to find similar items from")
        with self._lock:
            return np.asarray(ann.index_vectors_at(ann.unwrap(self.index)[0], [internal])[0], dtype=np.float32)

    def similarities(self, rows: list[int], target: int) -> np.ndarray | None:
        """Item-embedding cosine of each of ``rows`` with ``target`` (index-table rows); None for an index that
        cannot give its vectors back. The vectors stored beside the index come first: they cover retired rows
        too, which the FAISS index does not hold."""
        def vector(r: int) -> np.ndarray:
            if self._stored is not None:
                return np.asarray(self._stored[r], dtype=np.float32)
            return np.asarray(self.index.reconstruct(int(self.faiss_ids[r])), dtype=np.float32)

        try:
            v = np.stack([vector(r) for r in rows + [target]])
        except RuntimeError:
            logger.warning("index %s cannot reconstruct item vectors; history items are ranked without them",
                           self.version.name)
            return None
        v /= np.linalg.norm(v, axis=1, keepdims=True) + 1e-12
        return v[:-1] @ v[-1]
