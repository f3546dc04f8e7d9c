"""benchmarks/bench_load.py: both servers start on a run, every cell is measured, and a reranker that cannot run
gives error lines, not a crash."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow


def test_load_benchmark_measures_both_servers(tiny_run: Path, tmp_path: Path) -> None:
    # The tiny run with a reranker that cannot run: rerank.mode=sequence needs an item-sequence user tower,
    # so every rerank=true request is a 400, while rerank=false requests are answered as usual.
    run = Path(shutil.copytree(tiny_run, tmp_path / "run"))
    config = json.loads((run / "config.json").read_text())
    config["rerank"]["mode"] = "sequence"
    (run / "config.json").write_text(json.dumps(config))
    out = tmp_path / "load.json"
    proc = subprocess.run([sys.executable, "benchmarks/bench_load.py", "--run", str(run), "--clients", "1", "4",
                           "--requests", "20", "--rerank", "off", "on", "--warmup", "4", "--device", "cpu",
                           "--json", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stdout + proc.stderr

    result = json.loads(out.read_text())
    rows = {(r["mode"], r["rerank"], r["clients"]): r for r in result["rows"]}
    modes = ("one-at-a-time", "batching")
    assert set(rows) == {(m, rr, c) for m in modes for rr in ("off", "on") for c in (1, 4)}
    for mode in modes:
        for clients in (1, 4):
            r = rows[mode, "off", clients]
            assert (r["requests"], r["errors"], r["error"]) == (20, 0, None), r
            assert r["batch_size"] == (1 if mode == "one-at-a-time" else 32)
            assert 0 < r["rps"] < 100_000 and 0 < r["p50_ms"] <= r["p95_ms"] <= r["p99_ms"] < 60_000
            assert r["rps"] == pytest.approx(20 / r["seconds"], rel=0.01)
            broken = rows[mode, "on", clients]
            assert broken["requests"] == 0 and broken["rps"] is None
            assert broken["error"].startswith("HTTP 400: rerank.mode=sequence")
    ratios = {(r["rerank"], r["clients"]): r for r in result["ratios"]}
    assert set(ratios) == {("off", 1), ("off", 4)}  # nothing to compare where neither server could answer
    for (_, clients), r in ratios.items():
        base, batched = rows["one-at-a-time", "off", clients], rows["batching", "off", clients]
        assert r["rps_ratio"] == pytest.approx(batched["rps"] / base["rps"], abs=1e-3)
        assert r["p50_diff_ms"] == pytest.approx(batched["p50_ms"] - base["p50_ms"], abs=1e-3)

    lines = proc.stdout.splitlines()
    assert sum(line.startswith("one-at-a-time (bs 1)  off") for line in lines) == 2
    assert sum(line.startswith("batching (bs 32)      on") and "error: HTTP 400" in line for line in lines) == 2
    assert any(line.startswith("ratio: req/s with batching") for line in lines)
    ps = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout
    assert str(run) not in ps  # both servers were stopped


def test_batch_benchmark_prices_each_batch_size(tiny_run: Path, tmp_path: Path) -> None:
    out = tmp_path / "batch.json"
    proc = subprocess.run([sys.executable, "benchmarks/bench_batch.py", "--run", str(tiny_run), "--sizes", "1", "4",
                           "--repeats", "3", "--threads", "1", "--json", str(out)], cwd=ROOT, capture_output=True,
                          text=True, timeout=180)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rows = json.loads(out.read_text())["rows"]
    assert [r["batch"] for r in rows] == [1, 4]
    for r in rows:
        assert 0 < r["user_tower_ms"] and 0 < r["ms_per_request"] <= r["ms_per_batch"] < 60_000
        assert r["ms_per_request"] * r["batch"] == pytest.approx(r["ms_per_batch"])
    assert rows[0]["gain"] == 1.0 and rows[1]["gain"] == pytest.approx(rows[0]["ms_per_request"]
                                                                       / rows[1]["ms_per_request"])
    assert "gain vs 1" in proc.stdout
