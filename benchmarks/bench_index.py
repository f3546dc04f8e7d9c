"""FAISS index types against exact search on structured data: recall@10 and speed-up (same run, same data).

    python benchmarks/bench_index.py [--nb 200000] [--d 128]
"""

from __future__ import annotations

import argparse
import time

import faiss
import numpy as np
from faiss.contrib.datasets import SyntheticDataset

from index.store import build_faiss


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--nb", type=int, default=200_000)
    p.add_argument("--d", type=int, default=128)
    p.add_argument("--nq", type=int, default=1000)
    args = p.parse_args()
    ds = SyntheticDataset(args.d, 20_000, args.nb, args.nq, metric="IP")
    xb, xq = ds.get_database().astype(np.float32), ds.get_queries().astype(np.float32)
    ids = np.arange(args.nb, dtype=np.int64)
    results = {}
    for factory, nprobe in [("Flat", 1), ("HNSW32", 1), ("IVF1024,Flat", 16), ("IVF1024,PQ32", 16)]:
        t0 = time.time()
        index = build_faiss(xb, ids, factory, nprobe=nprobe, ef_search=64)
        build = time.time() - t0
        t0 = time.time()
        _, found = index.search(xq, 10)
        results[factory] = (time.time() - t0, found, build)
    exact_t, exact, _ = results["Flat"]
    print(f"{'index':<16}{'build s':>9}{'search s':>10}{'speed-up':>10}{'recall@10':>11}")
    for factory, (t, found, build) in results.items():
        recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(found, exact)])
        print(f"{factory:<16}{build:>9.2f}{t:>10.3f}{exact_t / t:>9.1f}x{recall:>11.3f}")
    print(f"faiss {faiss.__version__}, {args.nb} x {args.d} vectors, {args.nq} queries, GPUs: {faiss.get_num_gpus()}")


if __name__ == "__main__":
    main()
