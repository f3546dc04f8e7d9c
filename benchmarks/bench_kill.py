"""SIGKILL `build-index`, `reindex` and a resumable `train` at seeded random points; nothing may break.

    python benchmarks/bench_kill.py [--kills 20] [--seed 0] [--work /tmp/bench-kill] [--ml100k DIR]

On a small text-only slice of MovieLens-100K (150 items, 60 users; ``--ml100k``, default ``$TOWERREC_ML100K``
or ``../shared/datasets/movielens-100k-mm``) and the ``tiny`` setup with ``train.resumable=true``, each command
runs once uninterrupted to measure how long it takes, then ``--kills`` times as a subprocess killed with
SIGKILL after a seeded random delay. The delays are spread over the measured duration (one per equal slice
of it, at a random point inside the slice), so kills land in start-up, embedding, training and publishing.
After each kill:

- **the old version keeps answering**: a ``Recommender`` loaded before the kill answers from the version that
  was live then, and a fresh ``Recommender.load`` after it answers from the version ``LIVE`` names, which is
  the old one unless the killed process had already published (then the new one, complete). For ``train
  --overwrite`` over a served run, the run is either the old one, untouched (the same folder), or the new
  complete one; a resume state left beside it loads.
- **nothing is half-written**: every folder of ``index/`` that is not a staging folder (``.v...``,
  ``.reindex-...``) is a complete version that loads (index, items, vectors, export) against the towers, and
  the loaders ignore staging folders (``LIVE`` never names one; ``list_versions`` skips them).
- **a rerun completes**: the same command (``train`` with ``--resume`` when a resume state was left) exits 0
  and a version goes live that loads and answers a query (after ``train``, the new run is indexed first).

It prints the tally per command: kills, kills that landed after the command had published, reruns completed,
reruns that resumed from the killed process's saved work (reindex chunks, a training resume state), corrupt
versions, and the staging folders killed processes left behind (ignored by every loader).
``tests/index/test_kill.py`` runs two kills per command from this code (marked slow).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import polars as pl
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from configs import load_config  # noqa: E402
from data.atomic import scratch_dir  # noqa: E402
from data.catalog import catalog_sha256, load_catalog, write_catalog  # noqa: E402
from data.rundir import RunDir  # noqa: E402
from index.build import build_index  # noqa: E402
from index.recommender import Recommender  # noqa: E402
from index.store import Manifest, list_versions, live_version, read_vectors, read_version  # noqa: E402
from train.loop import train  # noqa: E402

COMMANDS = ("build-index", "reindex", "train")
# The tiny setup, resumable: item-sequence input (text input cannot resume), text only, 4 epochs of seconds.
TRAIN_SET = ["user.input=items", "user.init=random", "item.image.enabled=false", "item.audio.enabled=false",
             "train.epochs=4", "train.patience=10", "train.resumable=true"]
CHUNK_SIZE = {"build-index": 10, "reindex": 2}  # several chunks, so that kills land between them


@dataclass
class Tally:
    """Per command: what the kills did and what was checked after them."""

    kills: int = 0
    finished_first: int = 0  # attempts where the command ended before its kill time (retried earlier)
    published_before_kill: int = 0  # kills that landed after the new version (or run) was already published
    reruns_completed: int = 0
    reruns_resumed: int = 0  # reruns that started from work the killed process saved (chunks, a resume state)
    corrupt_versions: int = 0
    staging_left: int = 0  # staging folders and temporary files of killed processes still there at the end
    failures: list = field(default_factory=list)  # one line per failed check

    def fail(self, what: str) -> None:
        self.failures.append(what)


# -- data ----------------------------------------------------------------------------------------------------
def small_catalog(ml100k: Path, out: Path) -> Path:
    """A text-only slice of ML-100K: the 150 most rated movies, the first 60 users with 10 to 40 of them."""
    ratings = pl.read_csv(ml100k / "u.data", separator="\t", has_header=False,
                          new_columns=["user_id", "item_id", "rating", "timestamp"])
    top = ratings.group_by("item_id").len().sort(["len", "item_id"], descending=[True, False]).head(150)["item_id"]
    sliced = ratings.filter(pl.col("item_id").is_in(top.implode()))
    counts = sliced.group_by("user_id").len().sort("user_id")
    users = counts.filter((pl.col("len") >= 10) & (pl.col("len") <= 40)).head(60)["user_id"]
    events = sliced.filter(pl.col("user_id").is_in(users.implode())).sort(["user_id", "timestamp"])
    titles = pl.read_csv(ml100k / "u.item", separator="|", has_header=False, encoding="latin1", quote_char=None,
                         infer_schema=False).select(pl.col("column_0").cast(pl.Int64).alias("item_id"),
                                                    pl.col("column_1").alias("title"))
    items = pl.DataFrame({"item_id": sorted(top.to_list())}).join(titles, on="item_id", how="left")
    write_catalog(out, items, events)
    return out


def changed_catalog(source: Path, out: Path) -> Path:
    """``source`` with 2 items removed, 10 titles edited and 3 new items: 13 items to embed."""
    cat = load_catalog(source)
    ids = cat.items["item_id"].to_list()
    removed, edited = ids[:2], ids[2:12]
    items = cat.items.filter(~pl.col("item_id").is_in(removed)).with_columns(
        pl.when(pl.col("item_id").is_in(edited)).then(pl.col("title") + " (Restored)").otherwise(pl.col("title"))
        .alias("title"))
    new = pl.DataFrame({"item_id": [990001, 990002, 990003],
                        "title": ["A New Film (2026)", "Another New Film (2026)", "A Third New Film (2026)"]})
    items = pl.concat([items, new], how="diagonal_relaxed")
    write_catalog(out, items, cat.interactions.filter(~pl.col("item_id").is_in(removed)))
    return out


# -- commands ------------------------------------------------------------------------------------------------
def cli_command(command: str, run: Path, catalog: Path | None = None, resume: bool = False) -> list[str]:
    cmd = [sys.executable, str(REPO / "cli.py"), command, "--run", str(run), "--quiet"]
    if command == "train":
        cmd += ["--config", "tiny", "--catalog", str(catalog), "--overwrite", "--device", "cpu"]
        cmd += [a for s in TRAIN_SET for a in ("--set", s)] + (["--resume"] if resume else [])
    else:
        cmd += ["--device", "cpu", "--chunk-size", str(CHUNK_SIZE[command])]
        cmd += ["--catalog", str(catalog)] if catalog is not None else []
    return cmd


def _env() -> dict:
    return dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO), HF_HUB_OFFLINE="1",
                TRANSFORMERS_OFFLINE="1")


def run_to_end(cmd: list[str], timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=_env(), cwd=REPO)


def start_and_kill(cmd: list[str], delay: float) -> bool:
    """Start ``cmd``, SIGKILL it after ``delay`` seconds; False when it ended before that (no kill)."""
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=_env(), cwd=REPO)
    try:
        proc.wait(timeout=delay)
        return False
    except subprocess.TimeoutExpired:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        return True


def kill_points(duration: float, kills: int, rng: random.Random) -> list[float]:
    """One delay per equal slice of ``duration`` (a random point inside each): spread over the whole run."""
    return [duration * (k + rng.random()) / kills for k in range(kills)]


# -- checks --------------------------------------------------------------------------------------------------
def answer(rec: Recommender) -> str:
    """The version that answers a query for the recommender's first user (5 items, no rerank)."""
    user = sorted(rec.histories)[0]
    results = rec.recommend(user_id=user, k=5, rerank=False)
    if len(results) != 5:
        raise AssertionError(f"{len(results)} results instead of 5")
    return results.version


def check_versions(run: Path, tally: Tally, when: str) -> None:
    """Every entry of ``index/`` is a staging folder or file (dot-named, ignored by loaders), ``LIVE``, or a
    complete version that loads against the run's towers; anything else counts as a corrupt version."""
    root = run / RunDir.INDEX
    live = live_version(root)
    if live.name.startswith("."):
        tally.fail(f"{when}: LIVE names the staging folder {live.name}")
    ref = Manifest.read(live / RunDir.MANIFEST)  # every version holds vectors of the same towers
    versions = list_versions(root)
    for entry in sorted(root.iterdir()):
        if entry.name == RunDir.LIVE:
            continue
        if entry.name.startswith("."):
            if entry in versions:
                tally.fail(f"{when}: list_versions lists the staging folder {entry.name}")
            continue
        try:
            if entry not in versions:
                raise AssertionError("not a complete version folder")
            manifest = Manifest.read(entry / RunDir.MANIFEST)
            read_version(entry, ref.fingerprint, ref.dim)
            read_vectors(entry, manifest)
            parts = sorted((entry / RunDir.INDEX_EMBEDDINGS).glob("part-*.parquet"))
            if sum(pl.read_parquet(p).height for p in parts) != manifest.rows:
                raise AssertionError("the embeddings export does not hold every row")
        except Exception as err:  # noqa: BLE001 - any failure to load is what this counts
            tally.corrupt_versions += 1
            tally.fail(f"{when}: {entry.name} does not load ({type(err).__name__}: {err})")


def _versions_check(command: str, run: Path, catalog: Path | None, cmd: list[str], delay: float,
                    tally: Tally, label: str) -> None:
    """One kill of build-index or reindex on ``run``, and its checks and rerun."""
    old = live_version(run / RunDir.INDEX).name
    before = Recommender.load(run, device="cpu")
    if not start_and_kill(cmd, delay):
        tally.finished_first += 1
        raise _FinishedFirst
    tally.kills += 1
    try:
        if answer(before) != old:
            tally.fail(f"{label}: the recommender loaded before the kill stopped answering from {old}")
        now = live_version(run / RunDir.INDEX).name
        if now != old:
            tally.published_before_kill += 1
        if answer(Recommender.load(run, device="cpu")) != now:
            tally.fail(f"{label}: a fresh load after the kill does not answer from LIVE ({now})")
        check_versions(run, tally, f"{label} after the kill")
    except Exception as err:  # noqa: BLE001
        tally.fail(f"{label}: after the kill: {type(err).__name__}: {err}")
    if list((run / RunDir.INDEX).glob(f"{RunDir.REINDEX_WORK}*/chunk-*.parquet")):
        tally.reruns_resumed += 1
    proc = run_to_end(cmd)
    try:
        if proc.returncode != 0:
            raise AssertionError(f"rerun exited {proc.returncode}: {proc.stderr.strip()[-300:]}")
        live = live_version(run / RunDir.INDEX)
        manifest = Manifest.read(live / RunDir.MANIFEST)
        if catalog is not None and manifest.catalog_sha256 != catalog_sha256(catalog):
            raise AssertionError(f"the live version {live.name} does not serve {catalog.name}")
        if answer(Recommender.load(run, device="cpu")) != live.name:
            raise AssertionError("a fresh load does not answer from the live version")
        if answer(before) != old:
            raise AssertionError(f"the recommender loaded before the kill stopped answering from {old}")
        if list((run / RunDir.INDEX).glob(f"{RunDir.REINDEX_WORK}*")):
            raise AssertionError("the rerun left its work folder behind")
        check_versions(run, tally, f"{label} after the rerun")
        tally.reruns_completed += 1
    except Exception as err:  # noqa: BLE001
        tally.fail(f"{label}: rerun: {type(err).__name__}: {err}")


class _FinishedFirst(Exception):
    """The command ended before its kill time: the attempt is repeated with a shorter delay."""


def _train_check(run: Path, catalog: Path, delay: float, tally: Tally, label: str) -> None:
    """One kill of ``train --overwrite`` over a served run (``--resume`` when a resume state is there)."""
    state = RunDir(run).resume_path
    cmd = cli_command("train", run, catalog, resume=state.is_file())
    folder = run.stat().st_ino  # a published run replaces the folder (training is seeded: same weights)
    old = live_version(run / RunDir.INDEX).name
    before = Recommender.load(run, device="cpu")
    if not start_and_kill(cmd, delay):
        tally.finished_first += 1
        build_index(run, device="cpu", progress=False)  # the new run, served again for the next attempt
        raise _FinishedFirst
    tally.kills += 1
    try:
        if answer(before) != old:
            tally.fail(f"{label}: the recommender loaded before the kill stopped answering from {old}")
        if run.stat().st_ino == folder:  # the old run, untouched: it still serves its live version
            if answer(Recommender.load(run, device="cpu")) != old:
                tally.fail(f"{label}: the old run does not answer from {old} after the kill")
            check_versions(run, tally, f"{label} after the kill")
        else:  # published before the kill: a complete new run (not indexed yet)
            tally.published_before_kill += 1
            RunDir(run).require().read_config()
            RunDir(run).read_metrics()
        if state.is_file():
            saved = torch.load(state, map_location="cpu", weights_only=False)
            if not {"trainer", "selection"} <= set(saved):
                raise AssertionError(f"{state.name} lacks the trainer or selection state")
    except Exception as err:  # noqa: BLE001
        tally.fail(f"{label}: after the kill: {type(err).__name__}: {err}")
    tally.reruns_resumed += state.is_file()
    proc = run_to_end(cli_command("train", run, catalog, resume=state.is_file()))
    try:
        if proc.returncode != 0:
            raise AssertionError(f"rerun exited {proc.returncode}: {proc.stderr.strip()[-300:]}")
        if state.exists():
            raise AssertionError(f"{state.name} was left after the run completed")
        build_index(run, device="cpu", progress=False)
        if answer(Recommender.load(run, device="cpu")) != live_version(run / RunDir.INDEX).name:
            raise AssertionError("the retrained run does not answer from its live version")
        if answer(before) != old:
            raise AssertionError(f"the recommender loaded before the kill stopped answering from {old}")
        check_versions(run, tally, f"{label} after the rerun")
        tally.reruns_completed += 1
    except Exception as err:  # noqa: BLE001
        tally.fail(f"{label}: rerun: {type(err).__name__}: {err}")


# -- the benchmark -------------------------------------------------------------------------------------------
def prepare(work: Path, ml100k: Path) -> dict:
    """Catalogs A and B and a served run (trained, indexed) per command, under ``work``."""
    scratch_dir(work, "bench_kill")
    a = small_catalog(ml100k, work / "catalog-a")
    b = changed_catalog(a, work / "catalog-b")
    base = work / "base"
    train(load_config("tiny", TRAIN_SET), a, base, progress=False)
    build_index(base, device="cpu", progress=False)
    runs = {}
    for command in COMMANDS:
        runs[command] = work / f"run-{command}"
        shutil.copytree(base, runs[command])
    return {"a": a, "b": b, "runs": runs}


def run_kills(work: Path, ml100k: Path, kills: int = 20, seed: int = 0, commands=COMMANDS,
              log=print) -> dict[str, Tally]:
    """Measure each command, then kill it ``kills`` times at seeded points and check; returns the tallies."""
    setup = prepare(Path(work), Path(ml100k))
    a, b = setup["a"], setup["b"]
    rng = random.Random(seed)
    tallies = {}
    for command in commands:
        run, tally = setup["runs"][command], Tally()
        tallies[command] = tally
        catalog_of = (lambda i: b if i % 2 else a) if command == "reindex" else (lambda i: a)
        measure = cli_command(command, run, catalog_of(1) if command != "build-index" else None)
        t0 = time.time()
        proc = run_to_end(measure)
        duration = time.time() - t0
        if proc.returncode != 0:
            raise RuntimeError(f"{command} failed before any kill: {proc.stderr.strip()[-1000:]}")
        if command == "train":
            build_index(run, device="cpu", progress=False)
        log(f"{command}: one uninterrupted run takes {duration:.1f} s; {kills} kills over it")
        for i, delay in enumerate(kill_points(duration, kills, rng)):
            label = f"{command} kill {i + 1} at {delay:.2f} s"
            for attempt in range(5):
                try:
                    if command == "train":
                        _train_check(run, a, delay, tally, label)
                    else:
                        catalog = catalog_of(i) if command == "reindex" else None
                        _versions_check(command, run, catalog, cli_command(command, run, catalog), delay,
                                        tally, label)
                    break
                except _FinishedFirst:
                    delay *= 0.8
                    label = f"{command} kill {i + 1} at {delay:.2f} s (attempt {attempt + 2})"
            log(f"  {label}: {tally.kills} kills, {tally.reruns_completed} reruns completed, "
                f"{tally.corrupt_versions} corrupt, {len(tally.failures)} failed checks")
        left = staging_left(run)
        tally.staging_left = len(left)
        log(f"{command}: staging left by killed processes: {', '.join(p.name for p in left) or 'none'}")
    return tallies


def staging_left(run: Path) -> list[Path]:
    """What killed processes left beside the versions (ignored by loaders): staging folders of a version
    (``index/.v...``), reindex work folders, temporary files, and staged runs of ``train`` (``.RUN-training-...``)."""
    root = run / RunDir.INDEX
    inside = [p for p in root.iterdir() if p.name.startswith(".")] if root.is_dir() else []
    return sorted(inside + list(run.parent.glob(f".{run.name}-training-*")))


def format_tally(tallies: dict[str, Tally]) -> str:
    """The tally as a table, one row per command and a total, then every failed check."""
    head = ("command", "kills", "after publish", "reruns ok", "resumed", "corrupt", "failed", "ended first",
            "staging left")
    fields = ("kills", "published_before_kill", "reruns_completed", "reruns_resumed", "corrupt_versions",
              "failures", "finished_first", "staging_left")

    def row(name: str, values: list[Tally]) -> list:
        return [name] + [sum(len(v) if f == "failures" else v for v in (getattr(t, f) for t in values))
                         for f in fields]

    rows = [head, *(row(c, [t]) for c, t in tallies.items()), row("all", list(tallies.values()))]
    widths = [max(len(str(r[i])) for r in rows) for i in range(len(head))]
    lines = [" ".join(str(v).ljust(w) if i == 0 else str(v).rjust(w) for i, (v, w) in enumerate(zip(r, widths)))
             for r in rows]
    for command, t in tallies.items():
        lines += [f"FAILED {command}: {f}" for f in t.failures]
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--kills", type=int, default=20, help="kills per command")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--work", type=Path, default=Path("/tmp/bench-kill"), 
                   help="scratch folder: new, empty, or made by an earlier run (then made anew)")
    p.add_argument("--ml100k", type=Path, default=Path(os.environ.get(
        "TOWERREC_ML100K", REPO.parent / "shared" / "datasets" / "movielens-100k-mm")))
    p.add_argument("--commands", default=",".join(COMMANDS), help="comma-separated subset of " + ",".join(COMMANDS))
    args = p.parse_args()
    torch.set_num_threads(1)
    t0 = time.time()
    tallies = run_kills(args.work, args.ml100k, args.kills, args.seed, args.commands.split(","))
    print(format_tally(tallies))
    print(json.dumps({c: {k: v for k, v in t.__dict__.items() if k != "failures"} for c, t in tallies.items()}))
    print(f"{time.time() - t0:.0f} s in all")
    return 0 if all(not t.failures and t.reruns_completed == t.kills for t in tallies.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
