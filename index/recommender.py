"""The query API: ``Recommender.load(run_dir).recommend(user_id=..., k=10)``.

A query builds the user's profile prompt, embeds it with the user tower, retrieves candidates from the live
FAISS index (already-seen items excluded), and optionally reranks the top candidates with the LLM.
"""

from __future__ import annotations

import dataclasses
import logging
import numbers
import threading
import time
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
from errors import CheckpointError, ConfigError, IndexStateError, QueryError
from index import ann
from index.store import is_version_name, live_version, read_vectors, read_version
from index.where import where_mask
from towers.device import resolve_device
from towers.factory import TwoTower, item_fingerprint, load_towers
from towers.hub import load_tokenizer
from towers.sequence import ProfilePrefixes, title_table

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Recommendation:
    item_id: object
    title: str
    score: float  # final score (after rerank when it ran)
    retrieval_score: float  # cosine similarity from the two towers
    rerank_score: float | None = None  # the LLM reranker's score, when reranked
    reason: str | None = None  # a short personalised reason, when asked for (``explain=True``)
    reason_source: str | None = None  # "llm" (written by the LM, grounded in the history) or "template"
    reason_cites: tuple = ()  # the history item ids the reason names


MAX_K = 1000  # the most items one query returns
EXPLAIN_CANDIDATES = 3  # a reason may quote the history items with the most evidence for the recommendation: this many


class Results(list):
    """One query's answer: a ``list`` of :class:`Recommendation` (best first), so code written for the plain
    list keeps working, plus where and how fast it was answered.

    Attributes:
        version: name of the index version that answered (a folder under ``<run>/index/``).
        latency_ms: wall time of the call, from arguments to answer (for a batch: the whole batch's).
        hint: why the list is shorter than asked where the query itself explains it (e.g. every item of
            ``allow`` is already in the history), else None.
    """

    def __init__(self, items: Iterable[Recommendation] = (), version: str = "", latency_ms: float = 0.0,
                 hint: str | None = None):
        super().__init__(items)
        self.version = version
        self.latency_ms = latency_ms
        self.hint = hint

    @property
    def items(self) -> list[Recommendation]:
        """The recommendations as a plain list."""
        return list(self)

    def __repr__(self) -> str:
        hint = f", hint={self.hint!r}" if self.hint else ""
        return (f"Results(version={self.version!r}, latency_ms={self.latency_ms:.3f}{hint}, "
                f"items={list.__repr__(self)})")


@dataclass(frozen=True)
class Hits:
    """Retrieval for a batch of query vectors (:meth:`Recommender.search_vectors`), as arrays."""

    rows: np.ndarray  # (B, k) int64 items-table rows, best first; -1 past the end of a short list
    scores: np.ndarray  # (B, k) float32 inner products (cosine); -inf past the end
    version: str  # the index version that answered
    latency_ms: float  # wall time of the call


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
        self._reranker = None
        self._text_lm = None  # reasons under rerank.mode=sequence: a zero-shot text LM (see _text_reranker)
        self._explainer = None  # reasons: built on first use, for the reranker's LM (towers.explain.Explainer)
        self._matcher = None  # catalog titles for grounding reasons (towers.explain.TitleMatcher)
        self._reasons_lm = None  # reasons: the LM with the run's fine-tuned reasons adapter (train-reasons)
        self._use_reasons_adapter = True
        self._cooccurrence = None  # reasons' evidence: towers.explain.CoOccurrence over the served histories
        self._genres = None  # each index row's genres (towers.explain.genre_list), () without a genres column
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

    @property
    def reranker(self):
        """The LLM reranker in the mode of ``rerank.mode``, loaded on first use: with the run's fine-tuned adapter
        for that mode (``towerrec train-rerank``, and the fusion weight tuned with it) when there is one, else
        zero-shot. Its ``history`` builds the history prompt it reads."""
        if self._reranker is None:
            self._reranker = self.build_reranker()
        return self._reranker

    def build_reranker(self, adapter: bool = True, cfg=None):
        """A new :class:`towers.rerank.LLMReranker` as configured (or as ``cfg``, a ``RerankConfig``, says), with
        the run's adapter for its mode when ``adapter`` and there is one, and its ``history`` prompt builder
        attached."""
        from towers.rerank import LLMReranker, history_builder

        cfg = cfg or self.config.rerank
        if cfg.mode == "sequence":
            return self._sequence_reranker(cfg, adapter)
        ref = cfg.model or self.config.user.model
        rr = LLMReranker(cfg, ref, self.tokenizer if ref == self.config.user.model else None)
        if adapter:
            rr.load_adapter(self.run_dir)  # the adapter's own prompt settings replace rr.cfg's
        same = rr.cfg.history_tokens == 0 and rr.tokenizer is self.tokenizer
        rr.history = self.builder if same else history_builder(
            self.config.data, rr.cfg, self.titles, self.items["text"].to_list(), rr.tokenizer)
        return rr.to(self.device)

    def _sequence_reranker(self, cfg, adapter: bool):
        """The item-sequence cross-encoder (``rerank.mode: sequence``) from this run's user tower; served only
        fine-tuned (an untrained one scores every candidate alike)."""
        from towers.cross_rerank import SequenceReranker

        if self.vectors is None:
            raise ConfigError("rerank.mode=sequence reads history items as the user tower does: it needs an "
                              "item-sequence user tower (user.input: items); use listwise or pointwise")
        rr = SequenceReranker(cfg, self.model.user, self.vectors, self.id_rows, self.title_vectors)
        if adapter and not rr.load_adapter(self.run_dir):
            raise CheckpointError(f"{self.run_dir} has no fine-tuned sequence reranker: run `towerrec train-rerank "
                                  f"--run {self.run_dir} --mode sequence` first")
        return rr.to(self.device)

    def configure_rerank(self, **changes) -> None:
        """Change ``rerank`` settings for this recommender, e.g. ``configure_rerank(mode="listwise")``.

        The values are checked like a config file's (a bad one is a :class:`ConfigError` naming the field); the
        reranker reloads on next use, with the run's adapter for the new mode if it has one.
        """
        from configs import config_from_dict

        tree = self.config.to_dict()
        tree["rerank"].update(changes)
        self.config = config_from_dict(tree)
        self._reranker = self._text_lm = None
        self._reasons_lm = None

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
        prefixes = None  # user.profile_prefix: the profile state of what is older than the last max_len items
        if getattr(self.model.user, "profile", None) is not None:
            prefixes = ProfilePrefixes(self.model, self.builder, self.tokenizer.pad_token_id,
                                       self.config.user.batch_size)
        out = []
        for start in range(0, len(rows_of), 256):
            chunk = [np.asarray(r[-max_len:], dtype=np.int64) for r in rows_of[start:start + 256]]
            prefix = None if prefixes is None else prefixes([r[:-max_len] for r in rows_of[start:start + 256]])
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
            rerank: rerank the retrieved candidates with the LLM (default: the config's ``rerank.enabled``).
            exclude: item ids to leave out besides the history (which is always left out).
            allow: only these item ids may be recommended.
            deny: these item ids are never recommended.
            where: a condition on the items table's columns, as a polars expression (``pl.col("year") > 1990``)
                or SQL text (``"year > 1990 AND genres LIKE '%Drama%'"``); items where it is null do not pass.
                SQL text may use only the item columns, literals, comparisons, AND/OR/NOT, IN lists, LIKE, IS NULL,
                BETWEEN, arithmetic and a few scalar functions (:mod:`index.where`); anything else, such as a
                subquery or a table function, is a :class:`QueryError`.
            explain: give each recommendation a short reason grounded in the history (:meth:`explain`; an LM
                pass per query, so off by default): ``reason``, ``reason_source`` and ``reason_cites``.

        Returns a :class:`Results`: a list of :class:`Recommendation` (best first; fewer than ``k`` only when
        fewer items pass the filters) that also carries ``.version`` and ``.latency_ms``, and ``.hint`` where
        ``allow`` items were left out as already seen (also logged as a WARNING).
        """
        started = time.perf_counter()
        if user_id is None and history is None:
            raise QueryError("give a user_id (a known user) or a history (item ids, oldest first)")
        if user_id is not None and history is not None:
            raise QueryError("give either user_id or history, not both")
        return self._recommend(None if user_id is None else [user_id], None if history is None else [history],
                               k, rerank, None if exclude is None else [exclude], allow, deny, where, started,
                               explain)[0]

    def recommend_batch(self, user_ids: Sequence | None = None, histories: Sequence[Sequence] | None = None,
                        k: int = 10, rerank: bool | None = None, allow: Iterable | None = None,
                        deny: Iterable | None = None, where: str | pl.Expr | None = None,
                        explain: bool = False) -> list[Results]:
        """:meth:`recommend` for many users or histories at once (one retrieval, one :class:`Results` each).

        ``allow``, ``deny`` and ``where`` apply to every query. Each result's ``latency_ms`` is the whole
        batch's: that is how long each of its queries waited.
        """
        return self._recommend(user_ids, histories, k, rerank, None, allow, deny, where, time.perf_counter(), explain)

    def _recommend(self, user_ids, histories, k, rerank, exclude, allow, deny, where, started: float,
                   explain: bool = False) -> list[Results]:
        """Shared body of :meth:`recommend` and :meth:`recommend_batch` (``exclude``: one list per query)."""
        _check_k(k)
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
        rerank = self.config.rerank.enabled if rerank is None else bool(rerank)
        allow = None if allow is None else _id_list(allow, "allow")  # read twice: by _keep and for hints
        keep = self._keep(allow, deny, where)  # filters are checked before the (slower) user tower runs
        excluded = [self._rows(h, "history") for h in histories]
        if exclude is not None:
            excluded = [rows + self._rows(ex, "exclude") for rows, ex in zip(excluded, exclude)]
        users = self.embed_histories(histories)
        n_cand = max(k, self.config.rerank.candidates) if rerank else k
        hits = self._retrieve(users, n_cand, excluded, keep, self.knobs)
        lists = self._lists(hits)
        if rerank:
            lists = self.rerank_batch(histories, lists, k)
        lists = [recs[:k] for recs in lists]
        if explain:
            lists = [[dataclasses.replace(r, reason=str(x), reason_source=x.source, reason_cites=tuple(x.cites))
                      for r, x in zip(recs, self.explain(h, recs))] if recs else recs
                     for h, recs in zip(histories, lists)]
        hints = self._allow_hints(allow, keep, excluded, lists, k, "already seen (in the history or exclude)")
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
        _check_k(k)
        row = self.index_items.row(self._key(item_id))
        allow = None if allow is None else _id_list(allow, "allow")
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
        _check_k(k)
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
        record = ann.read_tuning(self.version) or {}
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
        tuning = ann.autotune(inner, np.asarray(self._stored[self._row_of], dtype=np.float32), target,
                              queries=self._tuning_queries(), apply=False)
        self.knobs.update(tuning.knobs)
        try:
            ann.write_tuning(self.version, tuning)
        except OSError as err:
            logger.warning("could not record the tuning in %s (%s); it is used for this process only",
                           self.version, err)

    def _tuning_queries(self, n: int = 1000, seed: int = 0) -> np.ndarray | None:
        """Queries from the real query distribution for :func:`ann.autotune`: the user-tower embeddings of a
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
            if len(self._where_cache) >= 64:
                self._where_cache.pop(next(iter(self._where_cache)))
            self._where_cache[key] = mask
        return mask

    def _allow_hints(self, allow: list | None, keep: np.ndarray | None, excluded: list[list[int]],
                     lists: list[list[Recommendation]], k: int, what: str) -> list[str | None]:
        """Per query, a hint where its list came out short of ``k`` because items of ``allow`` that pass the
        other filters were excluded (``what``: excluded as what), else None. Hints are logged (WARNING): one line
        for a single query, a count for a batch."""
        hints: list[str | None] = [None] * len(lists)
        if allow is None or all(len(recs) >= k for recs in lists):
            return hints
        rows = np.unique(np.asarray(self._rows(allow, "allow"), dtype=np.int64))
        internal = self._internal_of[rows]
        passing = internal >= 0  # retired items are never recommended: they do not count
        if keep is not None:
            passing &= keep[np.maximum(internal, 0)]
        passing = set(rows[passing].tolist())
        for q, (rows_q, recs) in enumerate(zip(excluded, lists)):
            left_out = passing.intersection(rows_q) if len(recs) < k else set()
            if not left_out:
                continue
            if left_out == passing:
                hints[q] = (f"all {len(passing)} allowed item(s) that pass the filters are {what}, and those are "
                            "never recommended")
            else:
                hints[q] = (f"{len(left_out)} of the {len(passing)} allowed items that pass the filters are {what} "
                            "and were left out")
        given = [h for h in hints if h]
        if len(lists) == 1 and given:
            logger.warning("allow: %s", given[0])
        elif given:
            logger.warning("allow: %d of %d queries came out short because allowed items were %s (see each "
                           "Results.hint)", len(given), len(lists), what)
        return hints

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

    def rerank(self, history: Sequence, candidates: list[Recommendation], k: int | None = None) -> list[Recommendation]:
        """Reorder retrieved candidates with the LLM reranker given the user's history; returns the top ``k``.

        The first ``rerank.candidates`` (the depth) are reranked: the final score is
        ``z(retrieval) + weight * z(llm)`` within them and ``rerank_score`` is the LLM's score (yes/no log-odds,
        or the letter logit in listwise mode). Candidates beyond the depth follow in retrieval order, unchanged.
        The same set of items comes out as went in.
        """
        return self.rerank_batch([history], [candidates], k)[0]

    def rerank_batch(self, histories: Sequence[Sequence], candidate_lists: Sequence[list[Recommendation]],
                     k: int | None = None) -> list[list[Recommendation]]:
        """:meth:`rerank` for many users; listwise prompts of several users share a forward pass."""
        if len(histories) != len(candidate_lists):
            raise QueryError(f"{len(histories)} histories for {len(candidate_lists)} candidate lists")
        depth = self.config.rerank.candidates
        todo = [u for u, c in enumerate(candidate_lists) if len(c[:depth]) >= 2]
        llm = []
        if todo:
            rr = self.reranker
            if rr.history is None:  # the sequence cross-encoder reads index rows, not a prompt
                llm = rr.score_rows([self._rows(histories[u], "history") for u in todo],
                                    [self._rows([c.item_id for c in candidate_lists[u][:depth]], "candidates")
                                     for u in todo])
            else:
                profiles = [rr.history.build(self._rows(histories[u], "history")).input_ids for u in todo]
                llm = rr.score_batch(profiles, [[c.title for c in candidate_lists[u][:depth]] for u in todo])
        scores = dict(zip(todo, llm))
        out = []
        for u, cands in enumerate(candidate_lists):
            cands = list(cands)
            if u in scores:
                head = cands[:depth]
                final = self.reranker.combine(torch.tensor([c.retrieval_score for c in head]), scores[u])
                order = torch.argsort(final, descending=True, stable=True).tolist()
                cands = [dataclasses.replace(head[o], score=float(final[o]), rerank_score=float(scores[u][o]))
                         for o in order] + cands[depth:]
            out.append(cands if k is None else cands[:k])
        return out

    def explain(self, history_or_user, recommendations: Sequence, llm: bool = True) -> list:
        """One short reason per recommendation, grounded in the user's history: a list of
        :class:`towers.explain.Reason` (``str(reason)`` is its text; ``cites`` the history item ids it names).

        ``history_or_user`` is a known user id or a history (item ids, oldest first); ``recommendations`` are
        :class:`Recommendation` objects or item ids. The history items the prompt shows are ranked by evidence
        for each recommendation (co-occurrence in the served users' histories, then item-embedding similarity);
        the prompt gives the top ``EXPLAIN_CANDIDATES`` with the genres each shares with the recommendation; the LM
        writes each reason (batched, at most ``rerank.explain_tokens`` tokens), and inside quotes it can only write
        the title of one of them, each at most once. A reason that fails the checks of its form
        (:func:`towers.explain.check_reason`: exact history titles, plain words, one short finished sentence), still
        names an item outside the history, cites none, or names a genre the recommendation does not share with an
        item it cites is replaced by the template over the two history items with the most evidence
        (``source="template"``); ``llm=False`` gives the templates alone, with no LM pass.
        """
        from towers.explain import (
            Ask,
            Reason,
            check_reason,
            genre_claims,
            ground,
            shared_genres,
            template_reason,
        )

        if isinstance(history_or_user, (str, bytes, numbers.Integral)) and not isinstance(history_or_user, bool):
            history = self.history_of(history_or_user)
        else:
            history = _id_list(history_or_user, "history")
        rows = self._rows(history, "history")
        if not rows:
            raise QueryError("empty history: give at least one item id")
        targets = [self.index_items.row(self._key(getattr(r, "item_id", r), "recommendations"))
                   for r in _id_list(recommendations, "recommendations")]
        if not targets:
            return []
        genres = self.genres
        texts = [None] * len(targets)
        if llm:
            explainer = self._reason_writer()
            profile = explainer.rr.history.build(rows)
            shown = list(dict.fromkeys(profile.items))
            asks = [Ask(self.titles[t], genres[t], tuple((self.titles[r], shared_genres(genres[t], [genres[r]], None))
                                                           for r in self.evidence_rank(shown, t, EXPLAIN_CANDIDATES)))
                    for t in targets]
            texts = explainer.generate(profile.input_ids, asks)
        unique = list(dict.fromkeys(rows))
        vocabulary = self._genre_vocabulary
        quotable = [self.titles[r] for r in unique]
        reasons = []
        for target, text in zip(targets, texts):
            checked = text is not None and check_reason(text, quotable, (self.titles[target], *vocabulary)) is None
            cites = ground(text, self._title_matcher, unique) if checked else None
            if cites is not None and genre_claims(text, vocabulary) <= set(
                    shared_genres(genres[target], [genres[c] for c in cites], limit=None)):
                reasons.append(Reason(text, tuple(self.item_ids[r] for r in cites), "llm"))
                continue
            best = self.evidence_rank(unique, target, 2)
            reasons.append(Reason(template_reason([self.titles[r] for r in best],
                                                  shared_genres(genres[target], [genres[r] for r in best])),
                                  tuple(self.item_ids[r] for r in best), "template"))
        return reasons

    def _reason_writer(self):
        """The :class:`towers.explain.Explainer` that writes reasons: the run's fine-tuned reasons adapter (unless
        :meth:`use_reasons_adapter` turned it off), else the reranker's text LM without its adapter."""
        from towers.explain import Explainer

        if self._use_reasons_adapter and self._reasons_lm is None:
            self._reasons_lm = self._load_reasons_lm() or False
        rr, adapter = (self._reasons_lm, True) if self._use_reasons_adapter and self._reasons_lm else \
            (self._text_reranker, False)
        if self._explainer is None or self._explainer.rr is not rr:
            self._explainer = Explainer(rr, adapter=adapter)  # reads the tokenizer's vocabulary once
        return self._explainer

    def _load_reasons_lm(self):
        """The text LM with the run's reasons adapter (``train-reasons``), or None when the run has none."""
        from towers.explain import REASONS
        from towers.rerank import read_adapter

        found = read_adapter(self.run_dir, REASONS)
        if found is None:
            return None
        weights, record, state = found
        rr = self.build_reranker(adapter=False, cfg=self._text_config())
        if record.get("model") != rr.model_ref:
            raise CheckpointError(f"{weights}: reasons adapter for model {record.get('model')!r}, not "
                                  f"{rr.model_ref!r}; rerun train-reasons")
        rr.add_lora(record["lora"])
        rr.load_adapter_state(state)
        rr.eval()
        rr.trained = record
        logger.info("reasons: fine-tuned adapter from %s", weights)
        return rr

    def use_reasons_adapter(self, on: bool = True) -> bool:
        """Write reasons with the run's fine-tuned reasons adapter (``on``, the default where the run has one) or
        with the zero-shot LM; returns whether the adapter is in use."""
        self._use_reasons_adapter = bool(on)
        return self._reason_writer().adapter

    @property
    def cooccurrence(self):
        """Reasons' evidence: :class:`towers.explain.CoOccurrence` over the served users' histories (built on
        first use; assign another, e.g. one over held-out-free histories, to evaluate reasons)."""
        if self._cooccurrence is None:
            from towers.explain import CoOccurrence

            known = [[self.index_items.row(i) for i in h if i in self.index_items] for h in self.histories.values()]
            self._cooccurrence = CoOccurrence(known, len(self.item_ids))
        return self._cooccurrence

    @cooccurrence.setter
    def cooccurrence(self, value) -> None:
        self._cooccurrence = value

    @property
    def genres(self) -> list[tuple[str, ...]]:
        """Each index row's genres, lower case (all empty when the index has no ``genres`` column)."""
        if self._genres is None:
            from towers.explain import genre_list

            cells = self.items["genres"].to_list() if "genres" in self.items.columns else [None] * len(self.item_ids)
            self._genres = [genre_list(g if isinstance(g, str) else None) for g in cells]
        return self._genres

    @property
    def _genre_vocabulary(self) -> list[str]:
        return sorted({g for gs in self.genres for g in gs})

    def evidence_rank(self, rows: list[int], target: int, n: int, cooccurrence=None,
                      exclude_user: int | None = None) -> list[int]:
        """The ``n`` of ``rows`` with the most evidence for ``target``: co-occurrence strength (``cooccurrence``,
        default :attr:`cooccurrence`; ``exclude_user`` not counted), then item-embedding cosine, then the most
        recent (``towers.explain.evidence_order``)."""
        from towers.explain import evidence_order

        co = self.cooccurrence if cooccurrence is None else cooccurrence
        order = evidence_order(co.strength(target, rows, exclude_user), self._similarities(rows, target))
        return [rows[i] for i in order[:n]]

    @property
    def _text_reranker(self):
        """The text LM that writes reasons: the reranker's own, or (``rerank.mode: sequence``, which has no text
        LM) a zero-shot listwise one, built once."""
        if self.config.rerank.mode != "sequence":
            return self.reranker
        if self._text_lm is None:
            self._text_lm = self.build_reranker(adapter=False, cfg=self._text_config())
        return self._text_lm

    def _text_config(self):
        """``rerank`` settings for a text LM (listwise: the sequence mode has no text prompt)."""
        from configs import LETTER_LABELS

        cfg = self.config.rerank
        if cfg.mode != "sequence":
            return cfg
        return dataclasses.replace(cfg, mode="listwise", candidates=min(cfg.candidates, LETTER_LABELS))

    @property
    def _title_matcher(self):
        from towers.explain import TitleMatcher

        if self._matcher is None:
            self._matcher = TitleMatcher(self.titles)
        return self._matcher

    def _similarities(self, rows: list[int], target: int) -> np.ndarray | None:
        """Item-embedding cosine of each of ``rows`` with ``target``; None for an index that cannot give its
        vectors back. The vectors stored beside the index come first: they cover retired rows too, which the
        FAISS index does not hold."""
        def vector(r: int) -> np.ndarray:
            if self._stored is not None:
                return np.asarray(self._stored[r], dtype=np.float32)
            return np.asarray(self.index.reconstruct(int(self.faiss_ids[r])), dtype=np.float32)

        try:
            v = np.stack([vector(r) for r in rows + [target]])
        except RuntimeError:
            logger.warning("index %s cannot reconstruct item vectors; reasons rank history items without them",
                           self.version.name)
            return None
        v /= np.linalg.norm(v, axis=1, keepdims=True) + 1e-12
        return v[:-1] @ v[-1]


def _check_k(k) -> None:
    """``k`` is an integer from 1 to :data:`MAX_K`."""
    if isinstance(k, bool) or not isinstance(k, numbers.Integral):
        raise QueryError(f"k must be an integer, got {type(k).__name__} {k!r}")
    if k < 1:
        raise QueryError(f"k must be at least 1, got {k}")
    if k > MAX_K:
        raise QueryError(f"k must be at most {MAX_K}, got {k}")


def _check_id_type(value, what: str) -> None:
    """Ids are ints or strings; bools, floats and anything else are refused, never coerced."""
    if isinstance(value, bool) or not isinstance(value, (str, numbers.Integral)):
        raise QueryError(f"{what} {value!r} has type {type(value).__name__}; ids are integers or strings")


def _as_int(value) -> int | None:
    """``value`` as an int if it is an int or a canonical integer string (``"42"``, not ``"042"`` or ``"4.0"``)."""
    if isinstance(value, numbers.Integral):
        return int(value)
    text = str(value).strip()
    digits = text.removeprefix("-")  # isdigit() also takes "²"; int() of thousands of digits is refused
    if digits.isascii() and digits.isdigit() and len(digits) <= 20 and str(int(text)) == text:
        return int(text)
    return None


def _id_list(ids, what: str) -> list:
    """A list of ids from a list/tuple/array; a bare string (``"12"``) is refused, not read as ``["1", "2"]``."""
    if isinstance(ids, (str, bytes)) or not isinstance(ids, Iterable):
        raise QueryError(f"{what} must be a list of ids, got {type(ids).__name__} {ids!r}")
    return list(ids.tolist() if isinstance(ids, np.ndarray) else ids)
