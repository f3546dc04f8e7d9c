"""A large synthetic catalog end to end: generate, prepare, train (set-up), reindex in chunks into IVF-PQ, serve.

    nice -n 19 python benchmarks/bench_scale.py --items 1000000 --interactions 5000000 --image-share 0.01 \\
        --work /tmp/scale1m [--config tiny] [--chunk-size 4096] [--json scale1m.json] [--compare scale100k.json]

Stages, each in its own process, timed (wall seconds) with its own peak RSS (``os.wait4``; the server's also
from ``/proc/PID/status`` VmHWM) and the disk its outputs take:

1. **generate**: ``items.parquet`` (item_id, title, genres, text, image_path for a seeded ``--image-share`` of
   the items, small generated PNG/JPEG files written one at a time) and ``interactions.parquet`` (Zipf-like item
   popularity, heavy-tailed user activity), each written in chunks of Parquet parts and then streamed into one
   file (``polars.sink_parquet``): never the whole table in memory.
2. **prepare**: ``cli.py prepare --items --interactions`` into a catalog.
3. **train (set-up, not measured as such)**: a small dense sub-catalog (the heaviest users' interactions with the
   2,000 most popular items, 5-core filtered, about ``--train-interactions``), prepared and trained for one
   epoch with ``--config``. Catalog items outside it get content-only (cold-start) embeddings at reindex.
4. **reindex**: ``cli.py reindex --catalog CATALOG --chunk-size N --factory IVF{nlist},PQ{dim/2}x4fs`` over every
   item (nlist: the power of two nearest 4 * sqrt(items)).
5. **bare text encoder** (the baseline, in the same run): the run's own text encoder, loaded as ``towers/`` loads
   it, on the first ``--encoder-sample`` items' texts in catalog order with the reindex's batch size, i.e. the
   reindex's first batches; the reindex's embedding items/s is reported against it.
6. **serve**: ``cli.py serve --port 0`` until it answers (load time), then ``--requests`` sequential
   ``POST /recommend`` for known users (latency percentiles), then stopped.

Threads: ``--threads`` (default 1) sets OMP_NUM_THREADS for every stage (as the tests do on this 2-core machine).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import polars as pl

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from data.atomic import scratch_dir  # noqa: E402

GiB = 2**30
SYLLABLES = ("ka", "lo", "mi", "ren", "tas", "vo", "qui", "da", "sel", "mor", "ni", "pa", "tor", "ex", "ul",
             "bri", "zan", "fe", "go", "hal", "jun", "ry", "cas", "dem", "ith", "ow", "pre", "sto", "wen", "yal")
GENRES = ("Drama", "Comedy", "Thriller", "Documentary", "Horror", "Romance", "Sci-Fi", "Animation", "Crime",
          "Western", "Music", "History")
HEAD_ITEMS = 2000  # the training sub-catalog's items are among the most popular ones
GEN_CHUNK = 50_000  # items per generated Parquet part (interactions: 20x that)


# -- stage bodies run in child processes (``--step``) ---------------------------------------------------------
def step_generate(a) -> dict:
    src = Path(a.work) / "src"
    parts = src / "parts"
    parts.mkdir(parents=True)
    rng = np.random.default_rng(a.seed)
    vocab = [x + y + z for x in SYLLABLES for y in SYLLABLES for z in ("", *SYLLABLES[:8])]
    images = 0
    for k, start in enumerate(range(0, a.items, GEN_CHUNK)):
        m = min(GEN_CHUNK, a.items - start)
        words = rng.integers(0, len(vocab), (m, 40)).tolist()
        n_title, n_text = rng.integers(2, 6, m).tolist(), rng.integers(15, 40, m).tolist()
        genre = rng.integers(0, len(GENRES), (m, 2)).tolist()
        has_image = (rng.random(m) < a.image_share).tolist()
        ids = range(start, start + m)
        paths = []
        for i, has in zip(ids, has_image):
            paths.append(write_image(src, i, rng) if has else None)
            images += has
        pl.DataFrame({
            "item_id": pl.Series(ids, dtype=pl.Int64),
            "title": [" ".join(vocab[w] for w in ws[:t]).title() for ws, t in zip(words, n_title)],
            "genres": ["|".join(GENRES[g] for g in sorted(set(gs))) for gs in genre],
            "text": [" ".join(vocab[w] for w in ws[:t]) + "." for ws, t in zip(words, n_text)],
            "image_path": pl.Series(paths, dtype=pl.Utf8),
        }).write_parquet(parts / f"items-{k:05d}.parquet")
    users = max(1, a.interactions // 20)
    for k, start in enumerate(range(0, a.interactions, 20 * GEN_CHUNK)):
        m = min(20 * GEN_CHUNK, a.interactions - start)
        pl.DataFrame({  # user u's share of activity falls as u^(-1/3), item i's popularity as i^(-2/3)
            "user_id": (users * rng.random(m) ** 1.5).astype(np.int64),
            "item_id": (a.items * rng.random(m) ** 3).astype(np.int64),
            "timestamp": 1_600_000_000 + rng.integers(0, 30_000_000, m),
        }).write_parquet(parts / f"interactions-{k:05d}.parquet")
    for name in ("items", "interactions"):
        pl.scan_parquet(parts / f"{name}-*.parquet").sink_parquet(src / f"{name}.parquet")
    shutil.rmtree(parts)
    return {"images": images}


def write_image(src: Path, item: int, rng: np.random.Generator) -> str:
    """A small generated image (a two-colour gradient with noise), PNG or JPEG by the item's parity."""
    from PIL import Image

    rel = f"media/{item // 10_000:04d}/{item}.{'png' if item % 2 else 'jpg'}"
    (src / rel).parent.mkdir(parents=True, exist_ok=True)
    a, b = rng.integers(0, 256, (2, 3))
    t = np.linspace(0, 1, 48)[None, :, None]
    pixels = a * (1 - t) + b * t + rng.integers(-20, 21, (48, 48, 3))
    Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(src / rel)
    return rel


def step_sample(a) -> dict:
    """The training sub-catalog's sources: heaviest users x most popular items, 5-core filtered."""
    src, out = Path(a.work) / "src", Path(a.work) / "train-src"
    out.mkdir()
    head = pl.scan_parquet(src / "interactions.parquet").filter(pl.col("item_id") < min(HEAD_ITEMS, a.items // 10))
    head = head.collect()
    per_user = head.group_by("user_id").len().sort("user_id")
    keep = per_user.filter(pl.col("len").cum_sum() <= max(a.train_interactions, per_user["len"][0]))["user_id"]
    df = head.filter(pl.col("user_id").is_in(keep.implode()))
    while True:  # the iterative 5-core filter training applies: survivors pass it as they are
        n = df.height
        df = df.filter(pl.len().over("item_id") >= 5).filter(pl.len().over("user_id") >= 5)
        if df.height == n:
            break
    if df.height == 0:
        raise SystemExit("no training interactions survive the 5-core filter: use more --interactions")
    df.write_parquet(out / "interactions.parquet")
    pl.scan_parquet(src / "items.parquet").filter(pl.col("item_id").is_in(df["item_id"].unique().implode())) \
        .sink_parquet(out / "items.parquet")
    return {"interactions": df.height, "users": df["user_id"].n_unique(), "items": df["item_id"].n_unique()}


def step_encoder(a) -> dict:
    """The bare text encoder of the run (tokenizer + backbone + pooling) on the reindex's first batches."""
    import torch

    from data.items import item_text
    from data.rundir import RunDir
    from towers.factory import load_towers
    from towers.hub import load_tokenizer

    torch.set_num_threads(a.threads)
    config = RunDir(a.run).read_config()
    encoder = load_towers(a.run, a.device).item.text
    tokenizer = load_tokenizer(config.item.text.model)
    batch = a.batch_size or config.item.text.batch_size
    items = pl.scan_parquet(Path(a.catalog) / "items.parquet").head(a.encoder_sample).collect()
    texts = item_text(items, config.data.item_text_chars)
    t0 = time.perf_counter()
    with torch.inference_mode():
        for i in range(0, len(texts), batch):
            enc = tokenizer(texts[i:i + batch], truncation=True, max_length=config.item.text.max_length,
                            padding=True, return_tensors="pt")
            encoder(enc["input_ids"].to(a.device), enc["attention_mask"].to(a.device))
    return {"items": len(texts), "seconds": time.perf_counter() - t0, "batch_size": batch}


def step_floor(a) -> dict:
    """What every stage's process starts from: the libraries the CLI imports, and no data."""
    import faiss  # noqa: F401
    import torch  # noqa: F401
    import transformers  # noqa: F401

    import towers.factory  # noqa: F401
    return {}


STEPS = {"generate": step_generate, "sample": step_sample, "encoder": step_encoder, "floor": step_floor}


# -- the parent: processes, sizes, the table -------------------------------------------------------------------
def run_child(cmd: list[str], log: Path, env: dict) -> tuple[float, float, str]:
    """Run ``cmd`` (stdout + stderr into ``log``); ``(wall s, peak RSS GiB, stdout)``; exits on failure."""
    t0 = time.perf_counter()
    with log.open("w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, cwd=REPO, env=env)
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
    wall, text = time.perf_counter() - t0, log.read_text()
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed (exit {proc.returncode}); {log}:\n{text[-3000:]}")
    return wall, usage.ru_maxrss * 1024 / GiB, text


def last_json(text: str) -> dict:
    return json.loads([line for line in text.splitlines() if line.startswith("{")][-1])


def disk(*paths: Path) -> float:
    """GiB allocated on disk under ``paths`` (files and folders)."""
    total = 0
    for path in paths:
        files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file() and not p.is_symlink()]
        total += sum(p.stat().st_blocks * 512 for p in files)
    return total / GiB


def default_factory(items: int, dim: int) -> str:
    nlist = 2 ** round(math.log2(4 * math.sqrt(items)))
    return f"IVF{nlist},PQ{max(1, dim // 2)}x4fs"


def serve_stage(a, run: Path, log: Path, env: dict) -> dict:
    """Start ``serve``, time its load, send ``--requests`` requests for known users, stop it."""
    cmd = [sys.executable, "cli.py", "serve", "--run", str(run), "--port", "0", "--device", a.device, "--poll", "0"]
    t0 = time.perf_counter()
    with log.open("w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, cwd=REPO, env=env)
    try:
        url = None
        while url is None:
            found = re.search(r"serving .* on (http://\S+) ", log.read_text())
            url = found and found.group(1)
            if proc.poll() is not None or time.perf_counter() - t0 > a.serve_timeout:
                raise SystemExit(f"serve exited ({proc.returncode}) or did not start within {a.serve_timeout} s; "
                                 f"{log}:\n{log.read_text()[-3000:]}")
            time.sleep(0.2)
        load_s = time.perf_counter() - t0
        users = pl.read_parquet(run / "histories.parquet", columns=["user_id"])["user_id"].unique().sort()
        users = users.sample(min(a.requests, users.len()), seed=0, with_replacement=a.requests > users.len())
        latencies = []
        for k, user in enumerate(users.to_list()[:2] + users.to_list()):  # two warm-up requests first
            body = json.dumps({"user_id": user, "k": 10, "rerank": False}).encode()
            req = urllib.request.Request(url + "/recommend", body, {"content-type": "application/json"})
            t1 = time.perf_counter()
            with urllib.request.urlopen(req, timeout=120) as resp:
                assert resp.status == 200 and json.loads(resp.read())["items"], resp.status
            if k >= 2:
                latencies.append(time.perf_counter() - t1)
        hwm = int(re.search(r"VmHWM:\s+(\d+) kB", Path(f"/proc/{proc.pid}/status").read_text()).group(1))
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    ms = np.array(latencies) * 1000
    return {"seconds": load_s, "rss": hwm * 1024 / GiB, "requests": len(ms), "p50_ms": float(np.median(ms)),
            "p95_ms": float(np.percentile(ms, 95)), "req_per_s": len(ms) / float(np.sum(latencies))}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--items", type=int, default=1_000_000)
    p.add_argument("--interactions", type=int, default=5_000_000)
    p.add_argument("--image-share", type=float, default=0.01, help="seeded share of items with a generated image")
    p.add_argument("--work", default="/tmp/bench-scale", help="scratch folder (new, empty, or made by this script)")
    p.add_argument("--config", default="tiny", help="setup trained and served (tiny, sasrec, hllm, ...)")
    p.add_argument("--chunk-size", type=int, default=4096, help="reindex items per resumable chunk")
    p.add_argument("--batch-size", type=int, help="item-tower batch (default: the config's item.text.batch_size)")
    p.add_argument("--factory", help="FAISS factory (default: IVF{nlist},PQ{dim/2}x4fs, nlist ~ 4 sqrt(items))")
    p.add_argument("--train-interactions", type=int, default=20_000, help="size of the training sub-catalog")
    p.add_argument("--encoder-sample", type=int, default=20_000, help="items the bare text encoder embeds")
    p.add_argument("--requests", type=int, default=200, help="POST /recommend requests timed")
    p.add_argument("--serve-timeout", type=float, default=3600, help="seconds serve may take to start")
    p.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS and torch threads of every stage")
    p.add_argument("--device", default="cpu")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", help="write the rows here")
    p.add_argument("--compare", help="rows of another size (--json of an earlier run): print the growth")
    p.add_argument("--step", choices=sorted(STEPS), help=argparse.SUPPRESS)
    p.add_argument("--run", help=argparse.SUPPRESS)
    p.add_argument("--catalog", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.step:  # a child process: one stage body, its result as one JSON line
        print(json.dumps(STEPS[a.step](a)))
        return

    work = scratch_dir(a.work, "bench_scale")
    src, catalog, run, logs = work / "src", work / "catalog", work / "run", work / "logs"
    logs.mkdir()
    env = dict(os.environ, OMP_NUM_THREADS=str(a.threads), MKL_NUM_THREADS=str(a.threads), TOKENIZERS_PARALLELISM="false")
    me = [sys.executable, str(Path(__file__).resolve()), "--work", str(work), "--items", str(a.items),
          "--interactions", str(a.interactions), "--seed", str(a.seed), "--threads", str(a.threads)]
    cli = [sys.executable, "cli.py"]
    rows = []

    def row(stage, seconds, items, rss, size, note="", **extra):
        rows.append({"stage": stage, "seconds": round(seconds, 2), "items_per_s": items / seconds if items else None,
                     "peak_rss_gib": round(rss, 3), "disk_gib": round(size, 4), "note": note, **extra})
        print(f"{stage}: {seconds:.1f} s, peak RSS {rss:.2f} GiB, disk {size:.3f} GiB {note}", flush=True)

    wall, rss, _ = run_child([*me, "--step", "floor"], logs / "floor.log", env)
    row("import floor", wall, 0, rss, 0.0, "a process importing torch, transformers, faiss and the towers")
    wall, rss, out = run_child([*me, "--step", "generate", "--image-share", str(a.image_share)], logs / "generate.log",
                               env)
    images = last_json(out)["images"]
    row("generate", wall, a.items, rss, disk(src), f"{a.items} items ({images} images), {a.interactions} interactions",
        images=images)

    wall, rss, out = run_child([*cli, "prepare", "--items", str(src / "items.parquet"), "--interactions",
                                str(src / "interactions.parquet"), "--out", str(catalog)], logs / "prepare.log", env)
    row("prepare", wall, a.items, rss, disk(catalog), out.strip().splitlines()[-1])

    w1, r1, out = run_child([*me, "--step", "sample", "--train-interactions", str(a.train_interactions)],
                            logs / "sample.log", env)
    sub = last_json(out)
    w2, r2, _ = run_child([*cli, "prepare", "--items", str(work / "train-src" / "items.parquet"), "--interactions",
                           str(work / "train-src" / "interactions.parquet"), "--media-root", str(src), "--out",
                           str(work / "train-catalog")], logs / "train-prepare.log", env)
    w3, r3, out = run_child([*cli, "train", "--config", a.config, "--catalog", str(work / "train-catalog"), "--run",
                             str(run), "--set", "train.epochs=1", "--json", "--device", a.device],
                            logs / "train.log", env)
    row("train (set-up)", w1 + w2 + w3, 0, max(r1, r2, r3), disk(run),
        f"sub-catalog {sub['interactions']} interactions, {sub['users']} users, {sub['items']} items; 1 epoch "
        f"{a.config} ({last_json(out)['seconds']} s)", sub_catalog=sub)

    dim = json.loads((run / "config.json").read_text())["dim"]
    factory = a.factory or default_factory(a.items, dim)
    cmd = [*cli, "reindex", "--run", str(run), "--catalog", str(catalog), "--chunk-size", str(a.chunk_size),
           "--factory", factory, "--device", a.device, "--quiet", "--json"]
    if a.batch_size:
        cmd += ["--batch-size", str(a.batch_size)]
    wall, rss, out = run_child(cmd, logs / "reindex.log", env)
    result = last_json(out)
    embed_s = result["timings"]["embed"]
    row("reindex", wall, a.items, rss, disk(run / "index"),
        f"{factory}, chunks of {a.chunk_size}: plan {result['timings']['plan']:.1f} s, embed {embed_s:.1f} s "
        f"({result['embedded'] / embed_s:.0f} items/s), publish {result['timings']['publish']:.1f} s",
        factory=factory, timings=result["timings"], embed_items_per_s=result["embedded"] / embed_s)

    enc_cmd = [*me, "--step", "encoder", "--run", str(run), "--catalog", str(catalog), "--device", a.device,
               "--encoder-sample", str(a.encoder_sample)] + (["--batch-size", str(a.batch_size)] if a.batch_size else [])
    wall, rss, out = run_child(enc_cmd, logs / "encoder.log", env)
    enc = last_json(out)
    bare = enc["items"] / enc["seconds"]
    row("bare text encoder", enc["seconds"], enc["items"], rss, 0.0,
        f"first {enc['items']} items' texts, batches of {enc['batch_size']} (process: {wall:.1f} s)")

    s = serve_stage(a, run, logs / "serve.log", env)
    row("serve", s["seconds"], a.items, s["rss"], 0.0,
        f"load until ready; {s['requests']} POST /recommend: p50 {s['p50_ms']:.1f} ms, p95 {s['p95_ms']:.1f} ms, "
        f"{s['req_per_s']:.1f} req/s", **{k: s[k] for k in ("requests", "p50_ms", "p95_ms", "req_per_s")})

    reindexed = next(r for r in rows if r["stage"] == "reindex")
    ratio = reindexed["embed_items_per_s"] / bare
    print(f"\n{a.items} items, {a.interactions} interactions, config {a.config}, device {a.device}, "
          f"{a.threads} thread(s)")
    print(f"{'stage':<19}{'time s':>9}{'items/s':>10}{'peak RSS GiB':>14}{'disk GiB':>10}")
    for r in rows:
        ips = f"{r['items_per_s']:.0f}" if r["items_per_s"] else "-"
        print(f"{r['stage']:<19}{r['seconds']:>9.1f}{ips:>10}{r['peak_rss_gib']:>14.2f}{r['disk_gib']:>10.3f}")
    print(f"embedding: reindex embeds {reindexed['embed_items_per_s']:.0f} items/s (embed phase; "
          f"{a.items / reindexed['seconds']:.0f} items/s over the whole stage), the bare text encoder {bare:.0f} "
          f"items/s on the same batches: {ratio:.2f}x")
    peak = max(r["peak_rss_gib"] for r in rows)
    print(f"largest peak RSS {peak:.2f} GiB ({max(rows, key=lambda r: r['peak_rss_gib'])['stage']}); "
          f"work folder {disk(work):.3f} GiB")
    if a.compare:
        other = {r["stage"]: r for r in json.loads(Path(a.compare).read_text())["rows"]}
        o_items = json.loads(Path(a.compare).read_text())["items"]
        print(f"\ngrowth against {a.compare} ({o_items} items; items x{a.items / o_items:.1f}):")
        for r in rows:
            if r["stage"] in other:
                o = other[r["stage"]]
                print(f"  {r['stage']:<19} time x{r['seconds'] / o['seconds']:.2f}, peak RSS "
                      f"x{r['peak_rss_gib'] / o['peak_rss_gib']:.2f}")
    if a.json:
        Path(a.json).write_text(json.dumps({"items": a.items, "interactions": a.interactions, "config": a.config,
                                            "threads": a.threads, "encoder_items_per_s": bare, "embed_ratio": ratio,
                                            "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
