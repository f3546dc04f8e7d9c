"""Search over a FAISS index: query-time knobs, auto-tuning them for a target recall, GPU placement, and a
filtered top-k that over-fetches until enough candidates survive the filters.

The index on disk is an ``IndexIDMap2`` over stable 64-bit ids (:mod:`index.store`). Searches here go to its
inner index, whose *internal* ids are dense (``0..ntotal-1``): masks are plain boolean arrays over them and
the caller maps internal ids to its own rows with one array lookup (:func:`unwrap` returns the id map).

Three searchers share one ``search(queries, k, keep=, exclude=, knobs=)`` signature:

- :class:`FaissSearcher` on the CPU, or on every GPU faiss sees (``index_cpu_to_all_gpus``, sharded with
  ``IndexShards`` across several);
- :class:`TorchSearcher`: exact search as a matrix product and ``topk`` in torch, for a machine where torch
  sees a GPU and faiss does not (the faiss-gpu wheel is not always installable). It runs on CPU tensors too,
  which is how the tests cover it without a GPU.

:func:`make_searcher` picks one and logs which; a GPU request never turns into a CPU search without a
WARNING saying so. :func:`index.tuning.autotune` picks the knobs for a target recall.
"""

from __future__ import annotations

import logging
import math

import faiss
import numpy as np
import torch

from errors import IndexStateError, QueryError

logger = logging.getLogger(__name__)

GPU_MAX_K = 2048  # faiss GPU indexes return at most this many neighbours per query
SELECTOR_BELOW = 0.05  # a filter passing fewer than this fraction of the items goes into the search itself
GROWTH = 4  # over-fetch: each retry asks for this many times more candidates
KNOBS = ("nprobe", "ef_search", "k_factor")
PARAMS_CACHE = 64  # search-parameter objects kept per searcher (cleared when full)


# -- the index's layers and its query-time knobs ------------------------------------------------------------
def unwrap(index: faiss.Index) -> tuple[faiss.Index, np.ndarray]:
    """``(inner index, id_map)``: ``id_map[i]`` is the stable id of internal id ``i`` (``(ntotal,)`` int64)."""
    index = faiss.downcast_index(index)
    if isinstance(index, (faiss.IndexIDMap2, faiss.IndexIDMap)):
        return faiss.downcast_index(index.index), faiss.vector_to_array(index.id_map).astype(np.int64)
    return index, np.arange(index.ntotal, dtype=np.int64)


def _layers(index: faiss.Index) -> list[faiss.Index]:
    """The index and the indexes it wraps (refine base, pre-transform, id map), outermost first."""
    out = []
    index = faiss.downcast_index(index)
    while index is not None:
        out.append(index)
        if isinstance(index, faiss.IndexRefine):
            index = faiss.downcast_index(index.base_index)
        elif isinstance(index, (faiss.IndexPreTransform, faiss.IndexIDMap2, faiss.IndexIDMap)):
            index = faiss.downcast_index(index.index)
        else:
            index = None
    return out


def knobs_of(index: faiss.Index) -> dict[str, int]:
    """The query-time knobs the index has, with their current values (``{}`` for an exact index)."""
    out = {}
    for layer in _layers(index):
        if isinstance(layer, faiss.IndexIVF):
            out["nprobe"] = int(layer.nprobe)
        elif isinstance(layer, faiss.IndexHNSW):
            out["ef_search"] = int(layer.hnsw.efSearch)
        elif isinstance(layer, faiss.IndexRefine):
            out["k_factor"] = int(layer.k_factor)
    return out


def knob_limits(index: faiss.Index) -> dict[str, int]:
    """Largest useful value of each knob (``nprobe``: the number of IVF lists)."""
    limits = {}
    for layer in _layers(index):
        if isinstance(layer, faiss.IndexIVF):
            limits["nprobe"] = int(layer.nlist)
        elif isinstance(layer, faiss.IndexHNSW):
            limits["ef_search"] = max(1, int(layer.ntotal))
        elif isinstance(layer, faiss.IndexRefine):
            limits["k_factor"] = 1024
    return limits


def is_exact(index: faiss.Index) -> bool:
    """Whether the index scores every vector exactly (a flat index, possibly behind an id map)."""
    return isinstance(_layers(index)[-1], faiss.IndexFlat) and not any(
        isinstance(x, (faiss.IndexRefine, faiss.IndexPreTransform)) for x in _layers(index))


def check_knobs(index: faiss.Index, knobs: dict | None) -> dict[str, int]:
    """``knobs`` validated against the index: known names, integers >= 1, only those the index has."""
    have, limits = knobs_of(index), knob_limits(index)
    out = {}
    for name, value in (knobs or {}).items():
        if value is None:
            continue
        if name not in KNOBS:
            raise QueryError(f"unknown search parameter {name!r}; use {', '.join(KNOBS)}")
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
            raise QueryError(f"{name} must be an integer >= 1, got {value!r}")
        if name not in have:
            kinds = ", ".join(f"{k}={v}" for k, v in have.items()) or "none: it is exact"
            raise QueryError(f"{name} does not apply to this index (its search parameters: {kinds})")
        out[name] = min(int(value), limits[name])
    return out


def apply_knobs(index: faiss.Index, knobs: dict) -> None:
    """Set knobs on the index itself (they are saved with it by ``faiss.write_index``)."""
    for layer in _layers(index):
        if isinstance(layer, faiss.IndexIVF) and "nprobe" in knobs:
            layer.nprobe = int(knobs["nprobe"])
        elif isinstance(layer, faiss.IndexHNSW) and "ef_search" in knobs:
            layer.hnsw.efSearch = int(knobs["ef_search"])
        elif isinstance(layer, faiss.IndexRefine) and "k_factor" in knobs:
            layer.k_factor = float(knobs["k_factor"])


def _parameters(index: faiss.Index, knobs: dict, sel, keep: list):
    """``faiss.SearchParameters`` for ``index`` (an inner index) with ``knobs`` and selector ``sel``.

    The selector goes to the innermost index that filters (a refine stage only re-scores its base's
    results). ``keep`` collects every SWIG object, which must outlive the search.
    """
    index = faiss.downcast_index(index)
    if isinstance(index, faiss.IndexRefine):
        p = faiss.IndexRefineSearchParameters()
        p.k_factor = float(knobs.get("k_factor", index.k_factor))
        p.base_index_params = _parameters(index.base_index, knobs, sel, keep)
    elif isinstance(index, faiss.IndexPreTransform):
        p = faiss.SearchParametersPreTransform()
        p.index_params = _parameters(index.index, knobs, sel, keep)
    elif isinstance(index, faiss.IndexIVF):
        p = faiss.SearchParametersIVF()
        p.nprobe = int(knobs.get("nprobe", index.nprobe))
        p.max_codes = index.max_codes
    elif isinstance(index, faiss.IndexHNSW):
        p = faiss.SearchParametersHNSW()
        p.efSearch = int(knobs.get("ef_search", index.hnsw.efSearch))
    else:
        p = faiss.SearchParameters()
    if sel is not None and not isinstance(index, (faiss.IndexRefine, faiss.IndexPreTransform)):
        p.sel = sel
    keep.append(p)
    return p


def _bitmap_selector(mask: np.ndarray, keep: list):
    """An ``IDSelectorBitmap`` over internal ids from a boolean mask."""
    bits = np.packbits(mask.astype(np.uint8), bitorder="little")
    keep.append(bits)
    sel = faiss.IDSelectorBitmap(len(mask), faiss.swig_ptr(bits))
    keep.append(sel)
    return sel


# -- searchers -----------------------------------------------------------------------------------------------
def _first_k(ok: np.ndarray, labels: np.ndarray, scores: np.ndarray, k: int):
    """Per row, the first ``k`` columns where ``ok``: ``(labels, scores)`` of shape ``(B, k)``, -1/-inf padded."""
    out_l = np.full((len(ok), k), -1, dtype=np.int64)
    out_s = np.full((len(ok), k), -np.inf, dtype=np.float32)
    rank = np.cumsum(ok, axis=1)
    r, c = np.nonzero(ok & (rank <= k))
    out_l[r, rank[r, c] - 1] = labels[r, c]
    out_s[r, rank[r, c] - 1] = scores[r, c]
    return out_l, out_s


def _exclusion_keys(exclude: list[np.ndarray] | None, n: int) -> np.ndarray | None:
    """Sorted ``query * n + internal id`` keys of per-query exclusions (``None`` when there are none).

    An id of -1 (an item that is not in the index, e.g. a retired one in a history) excludes nothing; lists
    made only of those give ``None``, as no exclusions do.
    """
    if not exclude:
        return None
    ids = [np.asarray(e, dtype=np.int64).reshape(-1) for e in exclude]
    keys = np.unique(np.concatenate([q * n + e[e >= 0] for q, e in enumerate(ids)]))
    return keys if len(keys) else None


def _excluded(keys: np.ndarray, queries: np.ndarray, labels: np.ndarray, n: int) -> np.ndarray:
    """``(B, F)`` bool: whether ``labels[b, f]`` is excluded for query ``queries[b]``."""
    probe = queries[:, None] * n + labels
    pos = np.minimum(np.searchsorted(keys, probe), len(keys) - 1)
    return keys[pos] == probe


class FaissSearcher:
    """Filtered top-k on a faiss index (CPU, or cloned to every GPU faiss sees).

    Filters are applied after the search, over-fetching: the first round asks for ``k / pass rate`` (plus
    the longest exclusion list) candidates, and each round that leaves a query short asks for ``GROWTH``
    times more, widening ``nprobe`` / ``efSearch`` too where the index ran out of candidates, until ``k``
    survive or the whole index was searched. A filter that passes under ``SELECTOR_BELOW`` of the items goes
    into the search itself as an ``IDSelectorBitmap`` instead (CPU only), so a narrow allow-list costs one
    round rather than a scan of most of the index.
    """

    def __init__(self, inner: faiss.Index, gpu: bool = False):
        self.cpu = faiss.downcast_index(inner)
        self.ntotal = int(self.cpu.ntotal)
        self.gpu = gpu
        self.limits = knob_limits(self.cpu)
        self._cpu_twin: FaissSearcher | None = None
        self.defaults = knobs_of(self.cpu)  # the index's own knob values
        self._params: dict[tuple, tuple] = {}  # (target, knobs) -> (SearchParameters, objects it references)
        # Asked for every item, HNSW scans its flat storage instead: its graph search returns only the nodes
        # it reached, which can be fewer than all.
        hnsw = next((x for x in _layers(self.cpu) if isinstance(x, faiss.IndexHNSW)), None)
        storage = None if hnsw is None else faiss.downcast_index(hnsw.storage)
        self._storage = storage if isinstance(storage, faiss.IndexFlat) and hnsw is self.cpu else None
        if gpu:
            ngpu = faiss.get_num_gpus()
            options = faiss.GpuMultipleClonerOptions()
            options.shard = ngpu > 1  # IndexShards: each GPU holds 1/ngpu of the vectors
            try:
                self.index = faiss.index_cpu_to_all_gpus(self.cpu, co=options, ngpu=ngpu)
            except (RuntimeError, AttributeError) as err:  # e.g. HNSW has no faiss GPU implementation
                raise IndexStateError(f"faiss cannot put a {type(self.cpu).__name__} index on the GPU: "
                                      f"{str(err).splitlines()[0] if str(err) else type(err).__name__}") from None
            self.max_k = GPU_MAX_K
            self.name = f"faiss GPU ({ngpu} GPU{'s, sharded' if ngpu > 1 else ''}), {type(self.cpu).__name__}"
        else:
            self.index = self.cpu
            self.max_k = max(1, self.ntotal)
            self.name = f"faiss CPU, {type(self.cpu).__name__}"

    def search(self, queries: np.ndarray, k: int, keep: np.ndarray | None = None,
               exclude: list[np.ndarray] | None = None, knobs: dict | None = None):
        """Top-``k`` internal ids and scores of ``queries (B, D)`` passing ``keep (ntotal,)`` and not in
        ``exclude[b]``: ``(scores (B, k) float32, labels (B, k) int64)``, best first, -inf / -1 padded when
        fewer than ``k`` items pass."""
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        assert queries.ndim == 2 and queries.shape[1] == self.cpu.d, (queries.shape, self.cpu.d)
        n, b = self.ntotal, len(queries)
        out_s = np.full((b, k), -np.inf, dtype=np.float32)
        out_l = np.full((b, k), -1, dtype=np.int64)
        passing = n if keep is None else int(keep.sum())
        if b == 0 or passing == 0:
            return out_s, out_l
        knobs = {**self.defaults, **(knobs or {})}
        refs: list = []
        sel = None
        if keep is not None and not self.gpu and passing < SELECTOR_BELOW * n:
            sel = _bitmap_selector(keep, refs)
        post_keep = keep if sel is None and passing < n else None
        keys = _exclusion_keys(exclude, n)
        longest = max((int((np.asarray(e) >= 0).sum()) for e in exclude), default=0) if exclude else 0
        rate = 1.0 if post_keep is None else passing / n
        fetch = min(n, math.ceil(k / rate * (1.1 if rate < 1 else 1.0)) + longest)
        pending = np.arange(b)
        while len(pending):
            f = min(fetch, n, self.max_k)
            if f >= n and self._storage is not None:
                target, round_knobs = self._storage, {}
            else:
                target, round_knobs = self.index, dict(knobs)
                if "ef_search" in self.limits:  # HNSW returns at most the efSearch nodes it explores
                    round_knobs["ef_search"] = max(f, round_knobs["ef_search"])
            params = self._parameters(target, round_knobs, sel, refs)
            scores, labels = target.search(queries[pending], f, params=params)
            if post_keep is None and keys is None and f == k and len(pending) == b and (labels >= 0).all():
                return scores, labels  # nothing to filter and nothing missing: faiss's answer as it is
            ok = labels >= 0
            if post_keep is not None:
                ok &= post_keep[np.maximum(labels, 0)]
            if keys is not None:
                ok &= ~_excluded(keys, pending, labels, n)
            short = ok.sum(axis=1) < k
            ran_out = (labels < 0).any(axis=1)  # fewer than f candidates under the current nprobe / efSearch
            wide = self._widest(knobs) or target is self._storage
            exhausted = (f >= n) & (wide | ~ran_out)
            done = ~short | exhausted
            if f >= self.max_k and f < n and short.any():
                done |= short  # the GPU's k limit: the rest go to the CPU twin (below)
            got_l, got_s = _first_k(ok[done], labels[done], scores[done], k)
            out_l[pending[done]], out_s[pending[done]] = got_l, got_s
            if f >= self.max_k and f < n and short.any():
                rest = pending[short & ~exhausted]
                logger.warning("filters left %d of %d queries short of k=%d within the GPU's %d candidates; "
                               "searching those on the CPU index", len(rest), b, k, self.max_k)
                if self._cpu_twin is None:
                    self._cpu_twin = FaissSearcher(self.cpu)
                sub_ex = [exclude[q] for q in rest] if exclude else None
                out_s[rest], out_l[rest] = self._cpu_twin.search(queries[rest], k, keep, sub_ex, knobs)
                break
            pending = pending[~done]
            if not len(pending):
                break
            fetch = f * GROWTH
            if ran_out[~done].any():
                knobs = self._widen(knobs)
        return out_s, out_l

    def raw(self, queries: np.ndarray, k: int, knobs: dict | None = None):
        """One plain faiss search with ``knobs`` (no filters, no over-fetch): ``(scores, labels)``."""
        params = self._parameters(self.index, {**self.defaults, **(knobs or {})}, None, [])
        return self.index.search(np.ascontiguousarray(queries, dtype=np.float32), min(k, self.max_k),
                                 params=params)

    def _parameters(self, target: faiss.Index, knobs: dict, sel, refs: list):
        """Search parameters for ``target``; without a selector they are built once per knob setting and
        shared (faiss only reads them, so concurrent searches may share one)."""
        if not knobs and sel is None:
            return None
        layers = self.cpu if target is self.index else target  # a GPU clone takes the CPU index's parameters
        if sel is not None:
            return _parameters(layers, knobs, sel, refs)
        key = (id(target), tuple(sorted(knobs.items())))
        cached = self._params.get(key)
        if cached is None:
            kept: list = []
            cached = (_parameters(layers, knobs, None, kept), kept)
            if len(self._params) >= PARAMS_CACHE:
                self._params.clear()
            self._params[key] = cached
        refs.append(cached)  # held by this search even if the cache is cleared meanwhile
        return cached[0]

    def _widest(self, knobs: dict) -> bool:
        """Whether nprobe / efSearch (those the index has) already reach everything."""
        return all(knobs[name] >= self.limits[name] for name in ("nprobe", "ef_search") if name in self.limits)

    def _widen(self, knobs: dict) -> dict:
        """``nprobe`` / ``efSearch`` times ``GROWTH`` (within their limits)."""
        out = dict(knobs)
        for name in ("nprobe", "ef_search"):
            if name in knobs:
                out[name] = min(self.limits[name], knobs[name] * GROWTH)
        return out


class TorchSearcher:
    """Exact top-k as ``queries @ vectors.T`` and ``torch.topk``, with filters applied to the scores.

    ``vectors (ntotal, D)`` are in internal-id order. Queries go in chunks so that one score matrix stays
    under ``max_scores`` floats.
    """

    def __init__(self, vectors: np.ndarray, device: torch.device | str, max_scores: int = 1 << 28):
        self.device = torch.device(device)
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        self.ntotal = len(vectors)
        if self.device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(self.device)
            need = vectors.nbytes + 4 * max_scores * 2
            if need > free:
                raise IndexStateError(f"exact search on {self.device} needs {need / 2**30:.1f} GiB for "
                                      f"{vectors.shape[0]} x {vectors.shape[1]} vectors, {free / 2**30:.1f} GiB free")
        self.vectors = torch.from_numpy(vectors).to(self.device)  # (N, D)
        self.max_scores = max_scores
        self.name = f"torch exact search (matrix product + top-k) on {self.device}"

    @torch.inference_mode()
    def search(self, queries: np.ndarray, k: int, keep: np.ndarray | None = None,
               exclude: list[np.ndarray] | None = None, knobs: dict | None = None):
        """Same contract as :meth:`FaissSearcher.search` (``knobs`` do not apply: the search is exact)."""
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        assert queries.ndim == 2 and queries.shape[1] == self.vectors.shape[1], queries.shape
        b, n = len(queries), self.ntotal
        out_s = np.full((b, k), -np.inf, dtype=np.float32)
        out_l = np.full((b, k), -1, dtype=np.int64)
        if b == 0 or n == 0:
            return out_s, out_l
        drop = None if keep is None else torch.from_numpy(~np.asarray(keep, dtype=bool)).to(self.device)
        kk = min(k, n)
        step = max(1, self.max_scores // n)
        for start in range(0, b, step):
            q = torch.from_numpy(queries[start:start + step]).to(self.device)
            scores = q @ self.vectors.T  # (b, N)
            if drop is not None:
                scores.masked_fill_(drop, float("-inf"))
            if exclude:
                rows = [(i, np.asarray(e, dtype=np.int64)) for i, e in enumerate(exclude[start:start + step])]
                r = np.concatenate([np.full(len(e), i) for i, e in rows])
                c = np.concatenate([e for _, e in rows])
                valid = c >= 0
                if valid.any():
                    scores[torch.from_numpy(r[valid]).to(self.device),
                           torch.from_numpy(c[valid]).to(self.device)] = float("-inf")
            vals, idx = torch.topk(scores, kk, dim=1)  # sorted, best first
            vals, idx = vals.float().cpu().numpy(), idx.cpu().numpy()
            idx[~np.isfinite(vals)] = -1
            out_s[start:start + step, :kk] = vals
            out_l[start:start + step, :kk] = idx
        return out_s, out_l


def index_vectors(inner: faiss.Index) -> np.ndarray:
    """Every vector of an inner index in internal-id order (decoded: exact for flat storage, approximate
    for PQ codes). IVF indexes get a direct map for this."""
    inner = faiss.downcast_index(inner)
    ivf = faiss.try_extract_index_ivf(inner)
    if ivf is not None and ivf.direct_map.type == faiss.DirectMap.NoMap:
        ivf.make_direct_map()
    try:
        return inner.reconstruct_n(0, inner.ntotal)
    except RuntimeError as err:
        raise IndexStateError(f"cannot read the vectors back from a {type(inner).__name__} index "
                              f"({str(err).splitlines()[0]})") from None


def index_vectors_at(inner: faiss.Index, internal_ids) -> np.ndarray:
    """Vectors of some internal ids of an inner index (``(n, D)``; IVF indexes get a direct map for this)."""
    inner = faiss.downcast_index(inner)
    ivf = faiss.try_extract_index_ivf(inner)
    if ivf is not None and ivf.direct_map.type == faiss.DirectMap.NoMap:
        ivf.make_direct_map()
    try:
        return np.stack([inner.reconstruct(int(i)) for i in internal_ids])
    except RuntimeError as err:
        raise IndexStateError(f"cannot read vectors back from a {type(inner).__name__} index "
                              f"({str(err).splitlines()[0]})") from None


def make_searcher(index: faiss.Index, device: str = "cpu", vectors: np.ndarray | None = None):
    """A searcher for ``index`` (an ``IndexIDMap2`` or an inner index) on ``device``: ``"cpu"`` or ``"gpu"``.

    ``"gpu"``: faiss's GPU index where faiss sees GPUs and has a GPU version of this index type (flat, IVF),
    otherwise exact search in torch on CUDA (over ``vectors`` in internal-id order, or the index's own,
    decoded). Neither available is an :class:`IndexStateError`: a GPU request never runs on the CPU. The
    chosen path is logged.
    """
    inner, _ = unwrap(index)
    if device == "cpu":
        searcher = FaissSearcher(inner)
    elif device == "gpu":
        if faiss.get_num_gpus() > 0 and _faiss_gpu_can(inner):
            searcher = FaissSearcher(inner, gpu=True)
        elif torch.cuda.is_available():
            if faiss.get_num_gpus() > 0:
                logger.info("faiss has no GPU version of %s; searching exactly in torch instead",
                            type(inner).__name__)
            searcher = TorchSearcher(index_vectors(inner) if vectors is None else vectors, "cuda")
        else:
            raise IndexStateError("GPU search requested, but neither faiss nor torch sees a GPU "
                                  "(use search_device='cpu')")
    else:
        raise IndexStateError(f"unknown search device {device!r}; use 'cpu' or 'gpu'")
    logger.info("search path: %s", searcher.name)
    return searcher


def _faiss_gpu_can(inner: faiss.Index) -> bool:
    """Whether faiss has a GPU implementation of this index type."""
    return isinstance(inner, (faiss.IndexFlat, faiss.IndexIVFFlat, faiss.IndexIVFPQ,
                              faiss.IndexIVFScalarQuantizer))
