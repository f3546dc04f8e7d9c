"""Serving overhead: ``Recommender.search_vectors`` against a raw ``faiss`` search of the same index with the
same query vectors (the user tower left out on both sides: retrieval alone), for a batch and for single
queries, on two paths measured in the same run:

- unfiltered: ``search_vectors(q, k)`` against ``index.search(q, k)``;
- history excluded, the path ``Recommender.recommend`` takes for a known user once its history is embedded:
  ``search_vectors(q, k, exclude=histories)``, which runs the same code as ``recommend`` (item ids to rows,
  then ``Recommender._retrieve`` and the searcher's over-fetch). Its baseline does the equivalent work in raw
  faiss: one ``index.search`` for ``k + len(history)`` candidates (HNSW's ``efSearch`` raised to that many,
  as the searcher does, so that it can return them), then each query's history ids dropped in numpy (sorted
  keys and ``searchsorted``, vectorised over the batch) and the first ``k`` kept. That is the fairest
  baseline: the same candidates and the same top-``k``. A per-query ``IDSelectorNot(IDSelectorBatch)``
  would force one faiss call per query in a batch, and on HNSW it filters inside the graph walk, which is
  different work with different results.

Synthetic histories (there are no towers): ``--histories`` items per user, seeded; each history is a random
half of the query's exact top-``h`` neighbours (a user vector lies near the items it was embedded from, so
the exclusion removes items that would otherwise be returned), the rest drawn uniformly from the catalog. The
Recommender gets them as lists of item ids, as ``recommend`` reads a known user's history; the raw side as
an array of FAISS ids.

The Recommender here serves a synthetic index (``SyntheticDataset``), built without towers: the benchmark
fills in just what retrieval reads. Its search parameters are auto-tuned (recall@10 0.95) and set on the
raw index too, so both do the same search; the raw side returns FAISS ids, the Recommender items-table rows.

    nice -n 19 python benchmarks/bench_serving.py                     # 1M x 128: Flat and HNSW32
    nice -n 19 python benchmarks/bench_serving.py --nb 100000 --factories "Flat;HNSW32"   # docs/results.md
    nice -n 19 python benchmarks/bench_serving.py --factories "HNSW32" --histories ""     # unfiltered only
"""

from __future__ import annotations

import argparse
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import faiss
import numpy as np
import polars as pl
from faiss.contrib.datasets import SyntheticDataset

from data.ids import ItemSpace
from index import ann
from index.recommender import Recommender
from index.store import build_faiss
from index.tuning import autotune

CLOCK = time.process_time  # see --clock


def retrieval_only(index: faiss.Index) -> Recommender:
    """A :class:`Recommender` over ``index`` with no towers: enough for :meth:`Recommender.search_vectors`."""
    _, ids = ann.unwrap(index)
    rec = Recommender.__new__(Recommender)
    rec.index, rec.version, rec.vectors = index, Path("synthetic"), None
    rec.items = pl.DataFrame({"faiss_id": ids, "item_id": ids, "title": [""] * len(ids)})
    rec.item_ids, rec.titles, rec.faiss_ids = ids.tolist(), [""] * len(ids), ids
    rec.index_items = rec.faiss_rows = ItemSpace(rec.item_ids, "synthetic")
    rec.int_ids = True
    rec.config = SimpleNamespace(index=SimpleNamespace(target_recall=0.0))  # knobs: the index's own (tuned)
    rec._lock = threading.Lock()
    rec._init_search("cpu")
    return rec


def histories(top: np.ndarray, ids: np.ndarray, h: int, seed: int) -> np.ndarray:
    """``(nq, h)`` distinct FAISS ids per query: a random ``h // 2`` of its exact top-``h`` (``top``: rows,
    best first) and the rest drawn uniformly from the catalog."""
    rng = np.random.default_rng(seed)
    out = np.empty((len(top), h), dtype=np.int64)
    for i, near in enumerate(top[:, :h]):
        chosen = set(rng.choice(near, h // 2, replace=False).tolist())
        while len(chosen) < h:
            chosen.update(rng.integers(0, len(ids), h - len(chosen)).tolist())
        out[i] = ids[rng.permutation(np.fromiter(chosen, dtype=np.int64))[:h]]
    return out


def fetch_params(index: faiss.Index, fetch: int):
    """Raw search parameters for ``fetch`` candidates: HNSW's ``efSearch`` at least ``fetch`` (as the
    Recommender's searcher sets it); ``None`` (the index's own tuned knobs) for other indexes."""
    inner, _ = ann.unwrap(index)
    knobs = ann.knobs_of(inner)
    if "ef_search" not in knobs:
        return None
    if not isinstance(inner, faiss.IndexHNSW):
        raise SystemExit(f"the raw baseline sets efSearch only on a plain HNSW index, not {type(inner).__name__}")
    p = faiss.SearchParametersHNSW()
    p.efSearch = max(fetch, knobs["ef_search"])
    return p


def raw_excluding(index: faiss.Index, q: np.ndarray, k: int, hist: np.ndarray, params, span: int):
    """Raw faiss with each query's ``hist`` (``(B, h)`` FAISS ids, all below ``span - 1``) left out: one search
    for ``k + h``, then the first ``k`` survivors per query as ``(scores, ids)``, -inf / -1 padded."""
    scores, labels = index.search(q, k + hist.shape[1], params=params)
    base = np.arange(len(q), dtype=np.int64)[:, None] * span
    keys = np.sort((base + hist).ravel())
    probe = base + labels  # a -1 label probes row * span - 1, which no key equals
    pos = np.minimum(np.searchsorted(keys, probe), len(keys) - 1)
    ok = (labels >= 0) & (keys[pos] != probe)
    rank = np.cumsum(ok, axis=1)
    r, c = np.nonzero(ok & (rank <= k))
    out_l = np.full((len(q), k), -1, dtype=np.int64)
    out_s = np.full((len(q), k), -np.inf, dtype=np.float32)
    out_l[r, rank[r, c] - 1], out_s[r, rank[r, c] - 1] = labels[r, c], scores[r, c]
    return out_s, out_l


def timed(fn, repeat: int) -> float:
    """Fastest of ``repeat`` runs, in seconds."""
    best = float("inf")
    for _ in range(repeat):
        t0 = CLOCK()
        fn()
        best = min(best, CLOCK() - t0)
    return best


def measure(index: faiss.Index, rec: Recommender, q: np.ndarray, k: int, repeat: int,
            hist: np.ndarray | None = None, span: int = 0) -> dict[str, float]:
    """Seconds for: the batch raw / through the Recommender (rows; and as Results objects), and the same
    queries one at a time, raw / through the Recommender. ``hist``: each query's history (FAISS ids), left
    out on both sides; ``None``: the unfiltered path."""
    if hist is None:
        def raw(s: slice):
            index.search(q[s], k)

        def via(s: slice):
            return rec.search_vectors(q[s], k)
    else:
        params = fetch_params(index, k + hist.shape[1])
        lists = hist.tolist()  # item ids (here equal to the FAISS ids), as Recommender.history_of gives them

        def raw(s: slice):
            raw_excluding(index, q[s], k, hist[s], params, span)

        def via(s: slice):
            return rec.search_vectors(q[s], k, exclude=lists[s])

    every = slice(None)
    runs = [("raw_batch", lambda: raw(every)), ("rec_batch", lambda: via(every)),
            ("rec_batch_results", lambda: rec.results(via(every))),
            ("raw_single", lambda: [raw(slice(i, i + 1)) for i in range(len(q))]),
            ("rec_single", lambda: [via(slice(i, i + 1)) for i in range(len(q))])]
    return {name: timed(fn, repeat if "batch" in name else max(1, repeat // 2)) for name, fn in runs}


def check(index, rec, q, k, ids, hist, span) -> None:
    """Both sides return the same top-``k`` (as FAISS ids) for a few queries."""
    n = min(5, len(q))
    if hist is None:
        raw, via = index.search(q[:n], k)[1], rec.search_vectors(q[:n], k).rows
    else:
        params = fetch_params(index, k + hist.shape[1])
        raw = raw_excluding(index, q[:n], k, hist[:n], params, span)[1]
        via = rec.search_vectors(q[:n], k, exclude=hist[:n].tolist()).rows
        assert not any(np.isin(ids[v], h).any() for v, h in zip(via, hist)), "the Recommender returned a history item"
    assert (np.where(via >= 0, ids[np.maximum(via, 0)], -1) == raw).mean() > 0.99


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--d", type=int, default=128)
    p.add_argument("--nb", type=int, default=1_000_000)
    p.add_argument("--nq", type=int, default=1000, help="queries in the batch (and single queries timed)")
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--histories", default="20,200", type=lambda s: [int(x) for x in s.split(",") if x],
                   help="history lengths (items per user, comma-separated) of the excluded path; '' for none")
    p.add_argument("--seed", type=int, default=0, help="seed of the synthetic histories")
    p.add_argument("--clock", choices=["cpu", "wall"], default="cpu",
                   help="cpu: this process's CPU time (robust on a shared machine; with 1 thread it is the "
                        "search time); wall: elapsed time")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--factories", default="Flat;HNSW32", type=lambda s: s.split(";"))
    args = p.parse_args()
    faiss.omp_set_num_threads(args.threads)
    global CLOCK
    CLOCK = time.process_time if args.clock == "cpu" else time.perf_counter
    ds = SyntheticDataset(args.d, 20_000, args.nb, args.nq, metric="IP")
    xb, xq = ds.get_database(), ds.get_queries()
    ids = np.arange(args.nb, dtype=np.int64) * 3 + 11  # stable ids that are not the row numbers
    span = int(ids.max()) + 2  # > every id + 1: the raw side's exclusion keys
    if args.histories and max(args.histories) > args.nb // 2:
        raise SystemExit(f"--histories: at most nb / 2 = {args.nb // 2} items per user")
    top = faiss.knn(xq, xb, max(args.histories), metric=faiss.METRIC_INNER_PRODUCT)[1] if args.histories else None
    paths = [("none", None)] + [(f"history {h}", histories(top, ids, h, args.seed + h)) for h in args.histories]
    print(f"{args.nb} x {args.d} vectors, {args.nq} queries, k={args.k}, {args.threads} thread(s), "
          f"histories {args.histories or '-'}", flush=True)
    rows = []
    for factory in args.factories:
        index = build_faiss(xb, ids, factory)
        autotune(index, xb, 0.95, n_queries=500)  # sets the tuned knobs on the index itself
        rec = retrieval_only(index)
        for path, hist in paths:
            check(index, rec, xq, args.k, ids, hist, span)
            t = measure(index, rec, xq, args.k, args.repeat, hist, span)
            rows.append((factory, path, rec.knobs, t))
            print(f"{factory}, {path}: batch raw {t['raw_batch'] * 1e3:.1f} ms, Recommender "
                  f"{t['rec_batch'] * 1e3:.1f} ms (ratio {t['raw_batch'] / t['rec_batch']:.3f}; with Results "
                  f"objects {t['raw_batch'] / t['rec_batch_results']:.3f}); single raw "
                  f"{t['raw_single'] / len(xq) * 1e3:.3f} ms, Recommender {t['rec_single'] / len(xq) * 1e3:.3f} ms",
                  flush=True)
        index = rec = None

    w = max(10, *(len(f) + 2 for f in args.factories))
    print()
    print(f"{'index':<{w}}{'excluded':<13}{'params':<18}{'batch ratio':>12}{'(+Results)':>11}{'single ratio':>13}"
          f"{'single raw ms':>15}{'added ms':>10}")
    for factory, path, knobs, t in rows:
        kn = ", ".join(f"{a}={b}" for a, b in knobs.items()) or "-"
        added_ms = (t["rec_single"] - t["raw_single"]) / args.nq * 1e3
        print(f"{factory:<{w}}{path:<13}{kn:<18}{t['raw_batch'] / t['rec_batch']:>12.3f}"
              f"{t['raw_batch'] / t['rec_batch_results']:>11.3f}{t['raw_single'] / t['rec_single']:>13.3f}"
              f"{t['raw_single'] / args.nq * 1e3:>15.3f}{added_ms:>+10.3f}")
    print("ratios: raw faiss time / Recommender time (1.0 = no overhead; aim >= 0.95); excluded: none, or each "
          "user's history left out (raw: search k + h, drop in numpy); added ms: Recommender minus raw per "
          "single query (aim < 1 ms)")


if __name__ == "__main__":
    main()
