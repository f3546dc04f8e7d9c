"""Reindex after a small catalog change against a full rebuild, and a killed reindex resumed against starting over.

    python benchmarks/bench_reindex.py --run RUN [--work /tmp/bench-reindex] [--fraction 0.01] [--chunk-size 64]

``RUN`` is a trained run (e.g. ``cli.py train --config sasrec --catalog CAT --run RUN``); it is copied, never
changed. Both comparisons are measured in the same process run, on the same machine and data:

1. A changed catalog (``--fraction`` of the items: a third edited, a third delisted, a third new) is indexed
   by ``reindex`` (only changed items embedded) and by a full rebuild (every item embedded, as
   ``build-index --catalog`` does). Proof that the results agree: identical vectors for unchanged items,
   the largest difference over all rows, and the top-10 of every user from both versions.
2. A full reindex in a subprocess is killed (SIGKILL) once about half of its chunks are on disk; the rerun
   resumes. Its time is compared with the same command run from scratch, and its vectors with that run's.

Times are wall seconds and CPU seconds (user + system, all threads): on a shared machine the CPU time is the
steadier measure of the work done.
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import polars as pl

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from data.atomic import scratch_dir  # noqa: E402
from data.catalog import load_catalog, write_catalog  # noqa: E402
from data.rundir import RunDir  # noqa: E402
from index.build import build_index  # noqa: E402
from index.recommender import Recommender  # noqa: E402
from index.reindex import reindex  # noqa: E402
from index.store import Manifest, live_version, read_vectors  # noqa: E402


def changed_catalog(source: Path, out: Path, fraction: float, seed: int = 0) -> dict:
    """``source`` with ``fraction`` of its items changed: a third edited (title and text), a third delisted
    (their interactions dropped), a third new (text only: cold start). Returns the changed ids."""
    cat = load_catalog(source)
    items, events = cat.items, cat.interactions
    rng = np.random.default_rng(seed)
    n = max(3, round(items.height * fraction))
    picked = rng.choice(items["item_id"].to_numpy(), size=n - n // 3, replace=False).tolist()
    edited, removed = picked[: n // 3 + n % 3], picked[n // 3 + n % 3:]
    new_ids = list(range(int(items["item_id"].max()) + 1, int(items["item_id"].max()) + 1 + n // 3))
    donors = items.filter(pl.col("text").is_not_null()).sample(len(new_ids), seed=seed)
    items = items.filter(~pl.col("item_id").is_in(removed)).with_columns(
        pl.when(pl.col("item_id").is_in(edited)).then(pl.col("title") + " (Director's Cut)")
        .otherwise(pl.col("title")).alias("title"),
        pl.when(pl.col("item_id").is_in(edited)).then(pl.col("text").fill_null("") + " Restored and extended.")
        .otherwise(pl.col("text")).alias("text"),
    )
    new = donors.with_columns(pl.Series("item_id", new_ids, dtype=items["item_id"].dtype),
                              (pl.lit("New release: ") + pl.col("title")).alias("title"),
                              pl.lit(None, dtype=pl.Utf8).alias("image_path"))
    items = pl.concat([items, new.select(items.columns)])
    events = events.filter(~pl.col("item_id").is_in(removed))
    media = {rel: source / rel for col in ("image_path", "audio_path") if col in items.columns
             for rel in items[col].drop_nulls().unique()}
    write_catalog(out, items, events, media)
    return {"edited": edited, "removed": removed, "added": new_ids}


def vectors_of(folder: Path) -> dict:
    items = pl.read_parquet(folder / RunDir.INDEX_ITEMS)
    vectors = np.asarray(read_vectors(folder, Manifest.read(folder / RunDir.MANIFEST)))
    return dict(zip(items["item_id"].to_list(), vectors))


def top10(run: Path) -> tuple[list, list]:
    rec = Recommender.load(run, device="cpu")
    users = sorted(rec.histories)
    return users, [[r.item_id for r in res] for res in rec.recommend_batch(user_ids=users, k=10, rerank=False)]


def cli_reindex(run: Path, catalog: Path, chunk: int) -> list[str]:
    return [sys.executable, str(REPO / "cli.py"), "reindex", "--run", str(run), "--catalog", str(catalog), "--full",
            "--chunk-size", str(chunk), "--quiet", "--device", "cpu"]


def children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def timed(cmd: list[str]) -> tuple[float, float]:
    """``(wall, cpu)`` seconds of a command (a subprocess: start-up included)."""
    t0, c0 = time.perf_counter(), children_cpu()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
    return time.perf_counter() - t0, children_cpu() - c0


def timed_call(fn, *args, **kwargs):
    """``(result, wall, cpu)`` of an in-process call."""
    t0, c0 = time.perf_counter(), time.process_time()
    out = fn(*args, **kwargs)
    return out, time.perf_counter() - t0, time.process_time() - c0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", required=True, help="a trained run (copied, never changed)")
    p.add_argument("--work", default="/tmp/bench-reindex", help="scratch folder: new, empty, or made by an earlier run (then made anew)")
    p.add_argument("--fraction", type=float, default=0.01, help="share of the catalog's items changed")
    p.add_argument("--chunk-size", type=int, default=64, help="chunk size of the killed / restarted reindex")
    args = p.parse_args()
    work = scratch_dir(args.work, "bench_reindex")
    source = RunDir(args.run).require()
    base = work / "base"
    shutil.copytree(source.path, base)
    if not (base / "index" / RunDir.LIVE).is_file():
        _, wall, cpu = timed_call(build_index, base, device="cpu", progress=False)
        print(f"initial index of the training catalog: {wall:.1f} s wall, {cpu:.1f} s CPU")
    training = Path(RunDir(base).catalog_ref()["path"])
    catalog = work / "catalog-v2"
    changed = changed_catalog(training, catalog, args.fraction)
    n_items = load_catalog(training).items.height
    print(f"catalog change: {len(changed['edited'])} edited, {len(changed['removed'])} delisted, "
          f"{len(changed['added'])} new of {n_items} items ({args.fraction:.0%})")

    # 1. reindex (incremental) against a full rebuild of the same changed catalog.
    inc_run, full_run = work / "incremental", work / "full"
    shutil.copytree(base, inc_run)
    shutil.copytree(base, full_run)
    inc, t_inc, c_inc = timed_call(reindex, inc_run, catalog, device="cpu", progress=False)
    full, t_full, c_full = timed_call(reindex, full_run, catalog, full=True, device="cpu", progress=False)
    a, b, before = vectors_of(inc.version), vectors_of(full.version), vectors_of(live_version(base / "index"))
    touched = set(changed["edited"]) | set(changed["removed"]) | set(changed["added"])
    unchanged = [i for i in b if i not in touched]
    copied_same = sum(np.array_equal(a[i], before[i]) for i in unchanged)
    diff_unchanged = max(float(np.abs(a[i] - b[i]).max()) for i in unchanged)
    diff_all = max(float(np.abs(a[i] - b[i]).max()) for i in b)
    users, lists_inc = top10(inc_run)
    _, lists_full = top10(full_run)
    same_top = sum(x == y for x, y in zip(lists_inc, lists_full))
    assert set(a) == set(b), "the two versions hold different items"
    print(f"\n{'':<31}{'wall s':>8}{'vs full':>9}{'CPU s':>8}{'vs full':>9}{'embedded':>10}")
    print(f"{'full rebuild (baseline)':<31}{t_full:>8.1f}{1:>8.2f}x{c_full:>8.1f}{1:>8.2f}x{full.embedded:>10d}")
    print(f"{'reindex (changed items only)':<31}{t_inc:>8.1f}{t_inc / t_full:>8.3f}x{c_inc:>8.1f}"
          f"{c_inc / c_full:>8.3f}x{inc.embedded:>10d}   ({inc.mode}, index {inc.index_update})")
    print(f"  phases: reindex {fmt(inc.timings)}; full {fmt(full.timings)}")
    print(f"  rows: {inc.rows} ({inc.searchable} searchable, {inc.retired} retired); added {inc.added}, "
          f"edited {inc.edited}, removed {inc.removed}")
    print(f"  unchanged items: {copied_same}/{len(unchanged)} vectors bit-identical to the previous version; "
          f"max |reindex - full| {diff_unchanged:.2e} (all rows: {diff_all:.2e})")
    print(f"  top-10 of all {len(users)} users: identical for {same_top}/{len(users)}")
    if same_top < len(users):
        print("  (differing lists differ by items whose scores tie within float rounding of other batch shapes)")

    # 2. A killed full reindex resumed, against the same command from scratch.
    fresh_run, killed_run = work / "fresh", work / "killed"
    shutil.copytree(base, fresh_run)
    shutil.copytree(base, killed_run)
    t_fresh, c_fresh = timed(cli_reindex(fresh_run, catalog, args.chunk_size))
    chunks = -(-full.rows // args.chunk_size)
    live0 = live_version(killed_run / "index")
    t0, c0 = time.perf_counter(), children_cpu()
    proc = subprocess.Popen(cli_reindex(killed_run, catalog, args.chunk_size), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    done = 0
    while proc.poll() is None:
        done = sum(len(list(w.glob("chunk-*.parquet"))) for w in (killed_run / "index").glob(".reindex-*"))
        if done >= chunks // 2:
            os.kill(proc.pid, signal.SIGKILL)
            break
        time.sleep(0.05)
    proc.wait()
    t_killed, c_killed = time.perf_counter() - t0, children_cpu() - c0
    if done < chunks // 2:
        raise SystemExit("the reindex finished before it could be killed: use a smaller --chunk-size")
    untouched = live_version(killed_run / "index") == live0  # nothing published by the killed process
    t_resume, c_resume = timed(cli_reindex(killed_run, catalog, args.chunk_size))
    resumed, fresh = vectors_of(live_version(killed_run / "index")), vectors_of(live_version(fresh_run / "index"))
    identical = all(np.array_equal(resumed[i], fresh[i]) for i in fresh) and set(resumed) == set(fresh)
    print(f"\nkilled reindex ({chunks} chunks of {args.chunk_size}; SIGKILL after {done} chunks, {t_killed:.1f} s; "
          f"{c_killed:.1f} CPU s; LIVE untouched by it: {untouched})")
    print(f"{'':<31}{'wall s':>8}{'vs fresh':>9}{'CPU s':>8}{'vs fresh':>9}")
    print(f"{'start over (baseline)':<31}{t_fresh:>8.1f}{1:>8.2f}x{c_fresh:>8.1f}{1:>8.2f}x")
    print(f"{'resume after the kill':<31}{t_resume:>8.1f}{t_resume / t_fresh:>8.2f}x{c_resume:>8.1f}"
          f"{c_resume / c_fresh:>8.2f}x   (CLI processes, start-up included)")
    print(f"  resumed version's vectors bit-identical to the uninterrupted run's: {identical}")


def fmt(timings: dict) -> str:
    return ", ".join(f"{k} {v:.1f} s" for k, v in timings.items())


if __name__ == "__main__":
    main()
