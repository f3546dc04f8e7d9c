"""benchmarks/bench_scale.py at a tiny size: every stage runs and reports a row with a time and a peak RSS."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def test_bench_scale_reports_every_stage(tmp_path: Path) -> None:
    out = tmp_path / "rows.json"
    proc = subprocess.run([sys.executable, "benchmarks/bench_scale.py", "--items", "2000", "--interactions", "10000",
                           "--image-share", "0.002", "--train-interactions", "3000", "--encoder-sample", "500",
                           "--requests", "5", "--chunk-size", "512", "--work", str(tmp_path / "work"),
                           "--json", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    result = json.loads(out.read_text())
    rows = {r["stage"]: r for r in result["rows"]}
    assert list(rows) == ["import floor", "generate", "prepare", "train (set-up)", "reindex", "bare text encoder",
                          "serve"]
    for r in rows.values():
        assert r["seconds"] > 0 and r["peak_rss_gib"] > 0, r
    assert rows["generate"]["images"] > 0 and rows["prepare"]["disk_gib"] > 0 and rows["reindex"]["disk_gib"] > 0
    assert rows["reindex"]["factory"].startswith("IVF") and rows["reindex"]["items_per_s"] > 0
    assert rows["serve"]["requests"] == 5 and rows["serve"]["p50_ms"] > 0
    assert result["embed_ratio"] > 0
    work = tmp_path / "work"
    assert (work / "catalog" / "items.parquet").is_file() and (work / "run" / "index" / "LIVE").is_file()
    assert not (work / "src" / "parts").exists()  # the generated parts were streamed into one file each
    assert "stage" in proc.stdout and "bare text encoder" in proc.stdout
