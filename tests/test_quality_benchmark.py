"""benchmarks/quality.py: one command trains setups, scores Pop, reads a peer's log, and writes JSON + markdown."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import polars as pl
import pytest

from data.catalog import write_catalog

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow

PEER_LOG = """$ recbole_peer.py synth/interactions.csv synth SASRec
synth: 1200 interactions, 100 users, 30 items
RESULT SASRec synth {'recall@10': 0.4321, 'ndcg@10': 0.2345, 'mrr@10': 0.1789} valid \
{'recall@10': 0.5, 'ndcg@10': 0.25, 'mrr@10': 0.2} secs 90.0
"""


def _catalog(out: Path) -> Path:
    rng = np.random.default_rng(0)
    items = pl.DataFrame({"item_id": list(range(30)), "title": [f"item number {i}" for i in range(30)]})
    rows = [(u, int(i), 1_000 + t) for u in range(100) for t, i in enumerate(rng.choice(30, 12, replace=False))]
    write_catalog(out, items, pl.DataFrame(rows, schema=["user_id", "item_id", "timestamp"], orient="row"),
                  meta={"source": "tests: quality benchmark"})
    return out


def _quality(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "benchmarks/quality.py", "--out", str(tmp_path / "q" / "quality"), *args],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)


def test_quality_writes_rows_that_accumulate(tmp_path: Path) -> None:
    catalog = _catalog(tmp_path / "cat")
    (tmp_path / "peer.log").write_text(PEER_LOG)
    proc = _quality(tmp_path, "--catalog", f"synth={catalog}", "--setup", "pop", "--setup", "tiny", "--set",
                    "train.epochs=1", "--runs", str(tmp_path / "runs"), "--peer", f"synth={tmp_path / 'peer.log'}")
    assert proc.returncode == 0, proc.stderr
    rows = json.loads((tmp_path / "q" / "quality.json").read_text())
    by = {(r["setup"], r["label"]): r for r in rows}
    assert set(by) == {("peer", "peer"), ("pop", "pop"), ("tiny", "after")}
    peer, pop, tiny = by["peer", "peer"], by["pop", "pop"], by["tiny", "after"]
    assert peer["test"] == {"recall@10": 0.4321, "ndcg@10": 0.2345, "mrr@10": 0.1789} and peer["minutes"] == 1.5
    assert peer["command"] == "recbole_peer.py synth/interactions.csv synth SASRec"
    assert 0 < pop["test"]["recall@10"] < 1 and pop["valid"]["ndcg@10"] > 0
    run = tmp_path / "runs" / "synth-tiny-after"
    metrics = json.loads((run / "metrics.json").read_text())
    assert tiny["test"]["ndcg@10"] == round(metrics["test"]["ndcg@10"], 4)  # the run's own single test pass
    assert tiny["command"].startswith("python cli.py train --catalog ") and "--set train.epochs=1" in tiny["command"]
    md = (tmp_path / "q" / "quality.md").read_text()
    assert "**synth**" in md and "RecBole SASRec" in md and "0.4321 / 0.2345 / 0.1789" in md
    assert md.index("| pop |") < md.index("RecBole SASRec") < md.index("| tiny (after")
    if (ROOT / ".git").exists():  # the commit that trained it, "+changes" for a checkout with edits
        assert len(tiny["commit"].split("+")[0]) >= 7 and f"| tiny (after, at {tiny['commit']}) |" in md

    # a second call with another label adds rows; the same key replaces its row
    proc = _quality(tmp_path, "--catalog", f"synth={catalog}", "--setup", "pop")
    assert proc.returncode == 0, proc.stderr
    assert len(json.loads((tmp_path / "q" / "quality.json").read_text())) == 3

    # --drop-test: the catalog without each user's test item, whose test target is the real validation target
    proc = _quality(tmp_path, "--catalog", f"synth={catalog}", "--setup", "pop", "--drop-test", "--runs",
                    str(tmp_path / "runs"))
    assert proc.returncode == 0, proc.stderr
    rows = {r["catalog"]: r for r in json.loads((tmp_path / "q" / "quality.json").read_text()) if r["setup"] == "pop"}
    assert rows["synth without test"]["test"] == rows["synth"]["valid"]
    assert "--drop-test" in rows["synth without test"]["command"]

    # --protocol cold-items: rows of their own, the share of new items in the top 10 reported
    proc = _quality(tmp_path, "--catalog", f"synth={catalog}", "--setup", "pop", "--setup", "tiny", "--set",
                    "train.epochs=1", "--set", "user.input=items", "--protocol", "cold-items", "--runs",
                    str(tmp_path / "runs"))
    assert proc.returncode == 0, proc.stderr
    cold = {r["setup"]: r for r in json.loads((tmp_path / "q" / "quality.json").read_text())
            if r["catalog"] == "synth cold-items"}
    assert set(cold) == {"pop", "tiny"} and "--protocol cold-items" in cold["tiny"]["command"]
    assert cold["pop"]["test"]["cold_share@10"] == 0.0 and 0 <= cold["tiny"]["test"]["cold_share@10"] <= 1
    assert cold["tiny"]["test"]["users"] == cold["pop"]["test"]["users"] > 0
    assert "new items:" in (tmp_path / "q" / "quality.md").read_text()

    # --init-from RUN --zero-shot: the tiny run's towers on the same catalog, untrained, content alone
    proc = _quality(tmp_path, "--catalog", f"synth={catalog}", "--setup", "tiny", "--label", "zero-shot",
                    "--init-from", str(run), "--zero-shot", "--set", "train.epochs=1", "--runs", str(tmp_path / "runs"))
    assert proc.returncode == 0, proc.stderr
    zero = [r for r in json.loads((tmp_path / "q" / "quality.json").read_text()) if r["label"] == "zero-shot"][0]
    assert f"--init-from {run.resolve()} --zero-shot" in zero["command"] and zero["epochs"] == 0
    assert "--protocol warm --init-from" in zero["command"]  # not the source run's protocol


def test_quality_refuses_what_it_cannot_use(tmp_path: Path) -> None:
    (tmp_path / "unfinished.log").write_text("synth: 1200 interactions\n")
    proc = _quality(tmp_path, "--peer", f"synth={tmp_path / 'unfinished.log'}")
    assert proc.returncode != 0 and "no 'RESULT ...' line" in proc.stderr
    proc = _quality(tmp_path, "--catalog", f"synth={tmp_path}", "--setup", "sasrec")
    assert proc.returncode != 0 and "--runs is required" in proc.stderr
    proc = _quality(tmp_path, "--catalog", "no-equals-sign")
    assert proc.returncode != 0 and "NAME=PATH" in proc.stderr
    proc = _quality(tmp_path, "--catalog", f"synth={tmp_path}", "--setup", "tiny", "--runs", str(tmp_path), "--zero-shot")
    assert proc.returncode != 0 and "--zero-shot needs --init-from" in proc.stderr
