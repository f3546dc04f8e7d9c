"""Quality table: train setups on catalogs, score validation and test, write JSON plus a markdown table.

Each trained row is one ``cli.py train`` run, exactly as a user starts it (a fresh process, timed from start to
finish), under the engine's protocol: leave-one-out by time, full ranking over every item, history excluded,
all users. Validation picks the epoch; the test figures are the run's single test pass. ``pop`` (most popular
unseen items, :func:`data.protocol.popularity_metrics`) needs no training. Peer rows (RecBole, run with
``../shared/tools/peer/recbole_peer.py``) are read from its log: the line ``RESULT ...`` and, if the log has
one, a first line ``$ COMMAND``.

::

    python benchmarks/quality.py --catalog microlens-dev=CATALOG [--catalog NAME=CATALOG ...] \\
        --setup pop --setup sasrec --setup default [--set KEY=VALUE ...] [--label after] \\
        [--engine CHECKOUT] [--peer microlens-dev=LOG] [--protocol cold-items] [--init-from RUN [--zero-shot]] \\
        --runs RUNS_DIR --out results/quality

Rows accumulate in ``OUT.json`` under the key (catalog, setup, label): running again replaces a row, other
rows stay, and ``OUT.md`` is rewritten from all of them. ``--engine`` trains with another checkout's
``cli.py`` (an older commit, for "before" rows); ``--label`` names the rows (default: ``after``).
"""

from __future__ import annotations

import argparse
import ast
import fcntl
import json
import os
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from data.atomic import write_text  # noqa: E402
from data.catalog import META_FILE  # noqa: E402
from data.rundir import RunDir  # noqa: E402

METRICS = ("recall@10", "ndcg@10", "mrr@10")
EXTRAS = ("users", "cold_share@10")  # kept where the protocol reports them
ORDER = ("pop", "peer", "sasrec", "default")  # row order within a catalog; other setups follow by name


def parse_pairs(values: list[str], flag: str) -> dict[str, str]:
    out = {}
    for v in values:
        name, sep, path = v.partition("=")
        if not sep or not name or not path:
            sys.exit(f"{flag} wants NAME=PATH, got {v!r}")
        out[name] = path
    return out


def train_row(engine: Path, catalog: str, setup: str, overrides: list[str], run: Path, threads: int,
              protocol: str = "warm", init_from: Path | None = None, zero_shot: bool = False) -> dict:
    """One ``cli.py train`` run in a fresh process; its --json line plus wall minutes and the command."""
    cmd = [sys.executable, "cli.py", "train", "--catalog", catalog, "--run", str(run), "--overwrite", "--json"]
    if protocol != "warm" or init_from is not None:  # a source run's config would bring its own protocol
        cmd += ["--protocol", protocol]
    if init_from is not None:
        cmd += ["--init-from", str(init_from)] + (["--zero-shot"] if zero_shot else [])
    if setup != "default":
        cmd += ["--config", setup]
    for o in overrides:
        cmd += ["--set", o]
    env = dict(os.environ)
    if threads:
        env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    t0 = time.time()
    proc = subprocess.run(cmd, cwd=engine, env=env, capture_output=True, text=True)
    minutes = (time.time() - t0) / 60
    if proc.returncode != 0:
        sys.stderr.write(proc.stderr[-4000:])
        sys.exit(f"training failed ({proc.returncode}): {shlex.join(cmd)}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    shown = ["python", "cli.py", *cmd[2:]]
    if threads:
        shown = [f"OMP_NUM_THREADS={threads}", *shown]
    return {"valid": pick(result["valid"]), "test": pick(result["test_retrieval"]), "minutes": round(minutes, 1),
            "best_epoch": result["best_epoch"], "refit_epochs": result.get("refit_epochs", 0),
            "command": shlex.join(shown), "commit": engine_commit(engine),
            "epochs": len(json.loads((run / RunDir.METRICS).read_text())["history"])}


def engine_commit(engine: Path) -> str:
    """The checkout's commit, with "+changes" when its tracked files differ from it ("" outside git)."""
    git = ["git", "-C", str(engine)]
    head = subprocess.run([*git, "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    if not head:
        return ""
    dirty = subprocess.run([*git, "diff", "--quiet", "HEAD"], capture_output=True).returncode != 0
    return head + ("+changes" if dirty else "")


def pop_row(catalog: str, overrides: list[str], command: str) -> dict:
    from configs import load_config
    from data.catalog import load_catalog
    from data.protocol import popularity_metrics, split_catalog

    t0 = time.time()
    split = split_catalog(load_config("hllm", overrides), load_catalog(catalog))
    valid, test = popularity_metrics(split, "valid"), popularity_metrics(split, "test")
    return {"valid": pick(valid), "test": pick(test), "minutes": round((time.time() - t0) / 60, 2),
            "command": command}


def peer_row(log: str) -> dict:
    """A RecBole peer run from its log: ``RESULT MODEL NAME {test} valid {valid} secs S``."""
    text = Path(log).read_text()
    m = re.search(r"^RESULT (\S+) (\S+) (\{.*?\}) valid (\{.*?\}) secs ([\d.]+)", text, re.M)
    if not m:
        sys.exit(f"{log}: no 'RESULT ...' line (is the peer run finished?)")
    first = text.splitlines()[0]
    command = first[2:] if first.startswith("$ ") else f"../shared/tools/peer/recbole_peer.py (log {log})"
    return {"valid": pick(ast.literal_eval(m.group(4))), "test": pick(ast.literal_eval(m.group(3))),
            "minutes": round(float(m.group(5)) / 60, 1) or None, "command": command, "model": f"RecBole {m.group(1)}"}


def without_test(catalog: str, out: Path) -> str:
    """A copy of ``catalog`` without each user's test item (what the split holds out last), so that its test
    target is the original validation target: recipe changes that only a test pass could judge (a refit) are
    then judged on validation users, and the real test targets stay unread."""
    import polars as pl

    from configs import load_config
    from data.catalog import load_catalog, write_catalog
    from data.protocol import split_catalog

    source = load_catalog(catalog)
    split = split_catalog(load_config("hllm"), source)
    rows = [(split.user_ids[u], split.item_ids[i], t) for u, seq in enumerate(split.sequences)
            for t, i in enumerate(seq[:-1].tolist())]  # the position is the time: the order is kept exactly
    interactions = pl.DataFrame(rows, schema={"user_id": source.interactions["user_id"].dtype,
                                              "item_id": source.interactions["item_id"].dtype,
                                              "timestamp": pl.Int64}, orient="row")
    items = source.items.drop(["image_path", "audio_path"], strict=False).with_columns(
        pl.lit(None, pl.String).alias("image_path"), pl.lit(None, pl.String).alias("audio_path"))  # no media
    write_catalog(out, items, interactions, meta={"source": f"{catalog} without each user's test item"},
                  overwrite=(out / META_FILE).exists())  # rebuilt each time: the source may have changed
    return str(out)


def pick(metrics: dict) -> dict:
    out = {k: round(float(metrics[k]), 4) for k in METRICS if k in metrics}
    out.update({k: metrics[k] for k in EXTRAS if k in metrics})
    if "by_history" in metrics:  # cold-users: NDCG@10 for each number of first items
        out["by_history"] = {n: {"ndcg@10": round(float(m["ndcg@10"]), 4), "users": m["users"]}
                             for n, m in metrics["by_history"].items()}
    return out


def markdown(rows: list[dict]) -> str:
    out = ["# Quality tables", "", "Written by `benchmarks/quality.py`; do not edit by hand. Validation and test: "
           "Recall@10 / NDCG@10 (and test MRR@10) over all users, full ranking, history excluded. Minutes: wall "
           "time of the whole command on this machine.", ""]
    for catalog in dict.fromkeys(r["catalog"] for r in rows):
        mine = [r for r in rows if r["catalog"] == catalog]
        mine.sort(key=lambda r: (ORDER.index(r["setup"]) if r["setup"] in ORDER else len(ORDER), r["setup"],
                                 r["label"] != "before", r["label"]))
        out += [f"**{catalog}**", "", "| setup | valid R@10 / N@10 | test R@10 / N@10 / MRR@10 | min | command |",
                "|---|---|---|---|---|"]
        for r in mine:
            v, t = r["valid"], r["test"]
            name = r.get("model") or r["setup"]
            label = "" if r["setup"] in ("pop", "peer") else f" ({r['label']})"
            if r.get("commit"):
                label = label[:-1] + f", at {r['commit']})"
            valid = f"{v['recall@10']:.4f} / {v['ndcg@10']:.4f}" if v else "–"
            test = " / ".join(f"{t[k]:.4f}" for k in METRICS if k in t)
            if "cold_share@10" in t:
                test += f" (new items: {100 * t['cold_share@10']:.0f}% of the top 10; {t['users']} users)"
            elif "by_history" in t:
                test += " (N@10 from the first " + ", ".join(f"{n}: {m['ndcg@10']:.4f}" for n, m in
                                                            t["by_history"].items()) + f"; {t['users']} targets)"
            minutes = "–" if r["minutes"] is None else r["minutes"]
            out.append(f"| {name}{label} | {valid} | {test} | {minutes} | `{r['command']}` |")
        out.append("")
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--catalog", action="append", default=[], metavar="NAME=DIR", help="a prepared catalog")
    ap.add_argument("--setup", action="append", default=[],
                    help="pop, default (train with no --config) or a config name such as sasrec (repeatable)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override for trained setups")
    ap.add_argument("--label", default="after", help="names these rows (rows are keyed by catalog, setup, label)")
    ap.add_argument("--engine", type=Path, default=ROOT, help="checkout whose cli.py trains (default: this one)")
    ap.add_argument("--peer", action="append", default=[], metavar="NAME=LOG", help="a RecBole peer run's log")
    ap.add_argument("--runs", type=Path, help="where the runs are written (required with trained setups)")
    ap.add_argument("--threads", type=int, default=0, help="OMP threads per run (0: torch's default)")
    ap.add_argument("--out", type=Path, required=True, help="writes OUT.json (rows accumulate) and OUT.md")
    ap.add_argument("--protocol", default="warm", choices=("warm", "cold-items", "cold-users"),
                    help="what validation and test hold out (train --protocol); rows are named 'NAME PROTOCOL'")
    ap.add_argument("--init-from", type=Path, metavar="RUN",
                    help="transfer: train from a run of another catalog (train --init-from; default setup: its config)")
    ap.add_argument("--zero-shot", action="store_true", help="with --init-from: no training (train --zero-shot)")
    ap.add_argument("--drop-test", action="store_true",
                    help="validation only: each catalog without its users' test items (written under --runs), so "
                         "its test target is the real validation target; rows are named 'NAME without test'")
    args = ap.parse_args()
    catalogs = parse_pairs(args.catalog, "--catalog")
    peers = parse_pairs(args.peer, "--peer")
    trained = [s for s in args.setup if s != "pop"]
    if trained and args.runs is None:
        sys.exit("--runs is required to train " + ", ".join(trained))
    if args.zero_shot and args.init_from is None:
        sys.exit("--zero-shot needs --init-from RUN")
    path = args.out.with_suffix(".json")

    def put(row: dict) -> None:
        """Merge a row into OUT.json under a lock: runs of this script side by side keep each other's rows."""
        path.parent.mkdir(parents=True, exist_ok=True)
        folder = os.open(path.parent, os.O_RDONLY)  # the lock is on the folder: OUT.json is replaced, not edited
        try:
            fcntl.flock(folder, fcntl.LOCK_EX)
            rows = json.loads(path.read_text()) if path.exists() else []
            rows = [r for r in rows if (r["catalog"], r["setup"], r["label"]) !=
                    (row["catalog"], row["setup"], row["label"])] + [row]
            write_text(path, json.dumps(rows, indent=1) + "\n")
            write_text(args.out.with_suffix(".md"), markdown(rows))
        finally:
            os.close(folder)
        t = row["test"]
        print(f"{row['catalog']:>16} {row['setup']:>8} {row['label']:>10}  test R@10 {t['recall@10']:.4f} "
              f"N@10 {t['ndcg@10']:.4f}  {row['minutes'] or '-'} min", flush=True)

    for name, log in peers.items():
        put({"catalog": name, "setup": "peer", "label": "peer", **peer_row(log)})
    if args.drop_test:
        if args.runs is None:
            sys.exit("--drop-test writes its catalogs under --runs: give --runs")
        given = {f"{n} without test": f"{n}={c} --drop-test --runs {args.runs}" for n, c in catalogs.items()}
        catalogs = {f"{n} without test": without_test(c, args.runs / f"{n}-without-test-catalog")
                    for n, c in catalogs.items()}
        args.set = ["data.min_count=3", *args.set]  # the users and items of the 5-cored catalog stay
    else:
        given = {n: f"{n}={c}" for n, c in catalogs.items()}
    if args.protocol != "warm":
        given = {f"{n} {args.protocol}": f"{g} --protocol {args.protocol}" for n, g in given.items()}
        catalogs = {f"{n} {args.protocol}": c for n, c in catalogs.items()}
        pop_set = [f"data.protocol={args.protocol}", *args.set]
    else:
        pop_set = args.set
    for name, catalog in catalogs.items():
        for setup in args.setup:
            if setup == "pop":
                command = f"python benchmarks/quality.py --catalog {given[name]} --setup pop"
                put({"catalog": name, "setup": "pop", "label": "pop", **pop_row(catalog, pop_set, command)})
                continue
            run = args.runs / re.sub(r"[^A-Za-z0-9_.-]+", "_", f"{name}-{setup}-{args.label}")
            put({"catalog": name, "setup": setup, "label": args.label, "overrides": args.set,
                 **train_row(args.engine.resolve(), str(Path(catalog).resolve()), setup, args.set, run.resolve(),
                             args.threads, args.protocol, args.init_from and args.init_from.resolve(),
                             args.zero_shot)})


if __name__ == "__main__":
    main()
