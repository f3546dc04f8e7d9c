"""What a batch of recommend calls costs in-process, by batch size: the ceiling on what dynamic batching can gain.

    python benchmarks/bench_batch.py --run RUN [--sizes 1 4 8 16 32] [--repeats 20] [--device cpu] [--json OUT]

Loads the run as ``serve`` does (:class:`rerank.Pipeline`) and answers batches of known users' calls
(``k`` 10, rerank off) through :meth:`rerank.Pipeline.recommend_each`, the server's batched path, with no HTTP.
For each batch size it prints the median ms per batch, the ms per request, the user tower's share (the
:meth:`index.recommender.Recommender.embed_histories` pass on the same histories, timed alone) and the gain:
the per-request cost at batch size 1, measured in the same run, over the per-request cost at this size. A
server can gain at most that much from batching, less whatever each request costs over HTTP.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def median_ms(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def run(args: argparse.Namespace) -> dict:
    import torch

    from rerank.pipeline import Pipeline

    if args.threads:
        torch.set_num_threads(args.threads)
    pipeline = Pipeline.load(args.run, device=args.device)
    rec = pipeline.retriever
    users = list(rec.histories)
    if not users:
        raise SystemExit(f"{args.run}: the run has no known users")
    rows = []
    for size in args.sizes:
        batch = [users[i % len(users)] for i in range(size)]
        calls = [{"user_id": u, "k": 10, "rerank": False} for u in batch]
        histories = [rec.history_of(u) for u in batch]
        answers = pipeline.recommend_each(calls)
        bad = [a for a in answers if isinstance(a, Exception)]
        if bad:
            raise SystemExit(f"batch of {size}: {bad[0]}")
        total = median_ms(lambda c=calls: pipeline.recommend_each(c), args.repeats)
        tower = median_ms(lambda h=histories: rec.embed_histories(h), args.repeats)
        rows.append({"batch": size, "ms_per_batch": total, "ms_per_request": total / size, "user_tower_ms": tower})
    base = next((r["ms_per_request"] for r in rows if r["batch"] == 1), None)
    print(f"{'batch':>5} {'ms/batch':>9} {'ms/request':>10} {'user tower ms':>13} {'gain vs 1':>9}")
    for r in rows:
        r["gain"] = None if base is None else base / r["ms_per_request"]
        gain = "-" if r["gain"] is None else f"{r['gain']:.2f}x"
        print(f"{r['batch']:>5} {r['ms_per_batch']:>9.2f} {r['ms_per_request']:>10.2f} {r['user_tower_ms']:>13.2f} "
              f"{gain:>9}")
    result = {"run": str(args.run), "device": args.device, "threads": torch.get_num_threads(), "rows": rows}
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", required=True, help="a trained run with a built index")
    parser.add_argument("--sizes", type=int, nargs="+", default=[1, 4, 8, 16, 32], help="batch sizes (1 first: "
                        "the baseline)")
    parser.add_argument("--repeats", type=int, default=20, help="timed batches per size (the median is kept)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--json", help="write the rows here")
    args = parser.parse_args()
    if any(s < 1 for s in args.sizes) or args.repeats < 1:
        parser.error("--sizes and --repeats must be >= 1")
    run(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
