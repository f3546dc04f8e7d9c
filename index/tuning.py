"""Auto-tuning an approximate index's query-time knobs (``nprobe``, ``efSearch``, a refine's ``k_factor``) for a
target recall@k, measured against exact search on held-out queries, and the record of it beside a version."""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import faiss
import numpy as np

from data.rundir import RunDir
from index.ann import FaissSearcher, _first_k, _layers, apply_knobs, knob_limits, knobs_of, unwrap

logger = logging.getLogger("index.ann")

# -- auto-tuning ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Tuning:
    """Knobs chosen for a target recall@k, measured against exact search."""

    knobs: dict  # e.g. {"nprobe": 24}; {} for an exact index
    target_recall: float
    recall: float  # recall@k on the tuning queries at these knobs
    heldout_recall: float  # recall@k on the held-out queries (not used to choose)
    k: int
    queries: int  # tuning queries
    heldout: int  # held-out queries
    reached: bool  # whether the target was reached on the tuning queries
    seconds: float = 0.0
    tried: list = field(default_factory=list)  # [(knobs, recall), ...] in the order tried

    def describe(self) -> str:
        """One line for the log."""
        if not self.knobs:
            return "exact index: no search parameters to tune"
        knobs = ", ".join(f"{k}={v}" for k, v in self.knobs.items())
        verdict = "reached" if self.reached else "NOT reached (best found)"
        return (f"{knobs}: recall@{self.k} {self.recall:.3f} on {self.queries} tuning queries, "
                f"{self.heldout_recall:.3f} on {self.heldout} held-out queries; target {self.target_recall} "
                f"{verdict}, tuned in {self.seconds:.1f}s")


def _grid(limit: int, start: int = 1) -> list[int]:
    """1, 2, 3, 4, 6, 8, 12, 16, 24, ... (steps of about sqrt 2) from ``start`` up to ``limit``, both included."""
    out, p = [start], 1
    while p <= limit:
        for v in (p, p + p // 2):
            if start <= v <= limit and v not in out:
                out.append(v)
        p *= 2
    if limit not in out:
        out.append(limit)
    return sorted(out)


def recall_at(found: np.ndarray, truth: np.ndarray) -> float:
    """Mean over queries of |found ∩ truth| / |truth|, ignoring -1 padding."""
    hits = [len(set(f[f >= 0].tolist()) & set(t[t >= 0].tolist())) / max(1, int((t >= 0).sum()))
            for f, t in zip(found, truth)]
    return float(np.mean(hits)) if hits else 0.0


def exact_top(vectors: np.ndarray, queries: np.ndarray, k: int) -> np.ndarray:
    """Row indices of the exact inner-product top-``k`` of each query, ``(Q, k)``."""
    _, rows = faiss.knn(np.ascontiguousarray(queries, dtype=np.float32),
                        np.ascontiguousarray(vectors, dtype=np.float32), k, metric=faiss.METRIC_INNER_PRODUCT)
    return rows


def autotune(index: faiss.Index, vectors: np.ndarray, target_recall: float = 0.95, k: int = 10,
             queries: np.ndarray | None = None, n_queries: int = 1000, seed: int = 0,
             apply: bool = True) -> Tuning:
    """Choose the cheapest ``nprobe`` / ``efSearch`` (and refine ``k_factor``) reaching ``target_recall``.

    Args:
        index: the built index (``IndexIDMap2`` or inner), holding ``vectors`` in internal-id order.
        vectors: ``(N, D)`` float32, the exact vectors in the index's internal-id order (ground truth).
        target_recall: recall@``k`` to reach against exact search.
        queries: ``(Q, D)`` sample queries (user vectors, or anything from the query distribution). Default:
            a seeded sample of ``vectors`` itself, each query's own item left out of both result lists.
        n_queries: how many queries to sample (half tune, half held out to check the choice).
        apply: set the chosen knobs on ``index`` (so ``faiss.write_index`` saves them).

    Knob values are tried cheapest first on a grid of steps of about sqrt(2); the first reaching the target
    on the tuning half wins, and its recall on the held-out half is reported. Where no value reaches it
    (IVF-PQ without a refine stage plateaus), the smallest value with the best recall is kept and a WARNING
    says so.
    """
    t0 = time.time()
    inner, _ = unwrap(index)
    have = knobs_of(inner)
    if not have:
        return Tuning({}, target_recall, 1.0, 1.0, k, 0, 0, True, 0.0)
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    assert vectors.shape == (inner.ntotal, inner.d), (vectors.shape, inner.ntotal, inner.d)
    rng = np.random.default_rng(seed)
    self_ids = None
    if queries is None:
        pick = rng.choice(len(vectors), size=min(n_queries, len(vectors)), replace=False)
        queries, self_ids = vectors[pick], pick
    else:
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        pick = rng.permutation(len(queries))[:n_queries]
        queries = queries[pick]
    extra = 0 if self_ids is None else 1
    kk = min(k + extra, len(vectors))
    truth = exact_top(vectors, queries, kk)
    if self_ids is not None:
        truth = _drop_self(truth, self_ids, k)
    half = max(1, len(queries) // 2)
    parts = (slice(0, half), slice(half, len(queries)))
    searcher = FaissSearcher(inner)

    def measure(knobs: dict, part: slice) -> float:
        _, found = searcher.raw(queries[part], kk, knobs)
        if self_ids is not None:
            found = _drop_self(found, self_ids[part], k)
        return recall_at(found, truth[part])

    limits = knob_limits(inner)
    primary = "nprobe" if "nprobe" in have else "ef_search"
    start = 1 if primary == "nprobe" else min(k, limits[primary])  # HNSW explores at least k nodes anyway
    factors = [1, 2, 4, 8, 16] if "k_factor" in have else [None]
    tried, best = [], None  # best: (reached, -cost, recall, knobs)
    for factor in factors:
        recalls = []
        for value in _grid(limits[primary], start):
            knobs = {primary: value, **({"k_factor": factor} if factor else {})}
            r = measure(knobs, parts[0])
            tried.append((knobs, round(r, 4)))
            recalls.append(r)
            if r >= target_recall:
                break
            if len(recalls) >= 4 and r - recalls[-4] < 0.002:  # a plateau below the target (PQ's own error)
                break
        cost = _cost(inner, knobs, k)
        candidate = (r >= target_recall, -cost if r >= target_recall else r, r, knobs)
        if best is None or candidate[:2] > best[:2]:
            best = candidate
        if r >= target_recall and factor is not None and value == 1:
            break
    reached, _, recall, knobs = best
    if not reached:  # the smallest value within 0.002 of the best recall seen
        top = max(r for _, r in tried)
        knobs = next(kn for kn, r in tried if r >= top - 0.002)
        recall = next(r for kn, r in tried if kn == knobs)
    heldout = measure(knobs, parts[1]) if half < len(queries) else recall
    tuning = Tuning(knobs, target_recall, round(float(recall), 4), round(float(heldout), 4), k, half, len(queries) - half,
                    bool(reached), round(time.time() - t0, 2), tried)
    if apply:
        apply_knobs(index, knobs)
    (logger.info if reached else logger.warning)("auto-tuned %s: %s", type(inner).__name__, tuning.describe())
    return tuning


def _cost(inner: faiss.Index, knobs: dict, k: int) -> float:
    """Rough bytes read per query at ``knobs``: IVF lists scanned, HNSW nodes visited, refine vectors."""
    cost = 0.0
    for layer in _layers(inner):
        if isinstance(layer, faiss.IndexIVF):
            cost += knobs.get("nprobe", layer.nprobe) * layer.ntotal / layer.nlist * layer.code_size
        elif isinstance(layer, faiss.IndexHNSW):
            cost += knobs.get("ef_search", layer.hnsw.efSearch) * 2 * layer.hnsw.nb_neighbors(0) * layer.d * 4
        elif isinstance(layer, faiss.IndexRefine):
            cost += knobs.get("k_factor", layer.k_factor) * k * layer.d * 4
    return cost


def _drop_self(labels: np.ndarray, self_ids: np.ndarray, k: int) -> np.ndarray:
    """Each row without its own query id, cut to ``k`` columns (-1 padded)."""
    ok = (labels != self_ids[:, None]) & (labels >= 0)
    out, _ = _first_k(ok, labels, np.zeros(labels.shape, dtype=np.float32), k)
    return out


def write_tuning(folder: Path, tuning: Tuning) -> Path:
    """Record a tuning as ``search.json`` in a version folder."""
    from index.store import write_durable

    path = Path(folder) / RunDir.INDEX_TUNING
    data = asdict(tuning)
    write_durable(path, lambda tmp: tmp.write_text(json.dumps(data, indent=2)))
    return path


def read_tuning(folder: Path) -> dict | None:
    """The tuning record of a version folder, or ``None`` where it has none."""
    path = Path(folder) / RunDir.INDEX_TUNING
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        logger.warning("%s: unreadable tuning record (%s)", path, err)
        return None
