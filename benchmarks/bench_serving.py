"""Serving overhead: ``Recommender.search_vectors`` against a raw ``faiss`` search of the same index with the
same query vectors (the user tower left out: retrieval alone), for a batch and for single queries.

The Recommender here serves a synthetic index (``SyntheticDataset``), built without towers: the benchmark
fills in just what retrieval reads. Its search parameters are auto-tuned (recall@10 0.95) and set on the
raw index too, so both do the same search; the raw side returns FAISS ids, the Recommender items-table rows.

    nice -n 19 python benchmarks/bench_serving.py                     # 1M x 128: Flat and HNSW32
    nice -n 19 python benchmarks/bench_serving.py --nb 100000 --factories "HNSW32"
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


def timed(fn, repeat: int) -> float:
    """Fastest of ``repeat`` runs, in seconds."""
    best = float("inf")
    for _ in range(repeat):
        t0 = CLOCK()
        fn()
        best = min(best, CLOCK() - t0)
    return best


def measure(index: faiss.Index, rec: Recommender, q: np.ndarray, k: int, repeat: int) -> dict[str, float]:
    """Seconds for: the batch raw / through the Recommender (rows; and as Results objects), and the same
    queries one at a time, raw / through the Recommender."""
    def raw_batch():
        index.search(q, k)

    def rec_batch():
        rec.search_vectors(q, k)

    def rec_batch_results():
        rec.results(rec.search_vectors(q, k))

    def raw_single():
        for i in range(len(q)):
            index.search(q[i:i + 1], k)

    def rec_single():
        for i in range(len(q)):
            rec.search_vectors(q[i:i + 1], k)

    runs = [("raw_batch", raw_batch), ("rec_batch", rec_batch), ("rec_batch_results", rec_batch_results),
            ("raw_single", raw_single), ("rec_single", rec_single)]
    return {name: timed(fn, repeat if "batch" in name else max(1, repeat // 2)) for name, fn in runs}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--d", type=int, default=128)
    p.add_argument("--nb", type=int, default=1_000_000)
    p.add_argument("--nq", type=int, default=1000, help="queries in the batch (and single queries timed)")
    p.add_argument("--k", type=int, default=10)
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
    print(f"{args.nb} x {args.d} vectors, {args.nq} queries, k={args.k}, {args.threads} thread(s)", flush=True)
    rows = []
    for factory in args.factories:
        index = build_faiss(xb, ids, factory)
        autotune(index, xb, 0.95, n_queries=500)  # sets the tuned knobs on the index itself
        rec = retrieval_only(index)
        assert (ids[rec.search_vectors(xq[:5], args.k).rows] == index.search(xq[:5], args.k)[1]).mean() > 0.99
        t = measure(index, rec, xq, args.k, args.repeat)
        added_ms = (t["rec_single"] - t["raw_single"]) / len(xq) * 1e3
        rows.append((factory, rec.knobs, t, added_ms))
        print(f"{factory}: batch raw {t['raw_batch'] * 1e3:.1f} ms, Recommender {t['rec_batch'] * 1e3:.1f} ms "
              f"(ratio {t['raw_batch'] / t['rec_batch']:.3f}; with Results objects "
              f"{t['raw_batch'] / t['rec_batch_results']:.3f}); single raw {t['raw_single'] / len(xq) * 1e3:.3f} ms, "
              f"Recommender {t['rec_single'] / len(xq) * 1e3:.3f} ms, added {added_ms:+.3f} ms/query", flush=True)
        index = rec = None

    print()
    print(f"{'index':<10}{'params':<18}{'batch ratio':>12}{'(+Results)':>11}{'single raw ms':>15}"
          f"{'added ms':>10}")
    for factory, knobs, t, added_ms in rows:
        kn = ", ".join(f"{a}={b}" for a, b in knobs.items()) or "-"
        print(f"{factory:<10}{kn:<18}{t['raw_batch'] / t['rec_batch']:>12.3f}"
              f"{t['raw_batch'] / t['rec_batch_results']:>11.3f}{t['raw_single'] / args.nq * 1e3:>15.3f}"
              f"{added_ms:>+10.3f}")
    print("batch ratio: raw faiss time / Recommender time (1.0 = no overhead; aim >= 0.95); "
          "added ms: Recommender minus raw per single query (aim < 1 ms)")


if __name__ == "__main__":
    main()
