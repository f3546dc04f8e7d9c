"""Kill tests: build-index, reindex and a resumable train killed with SIGKILL at seeded points.

The logic lives in ``benchmarks/bench_kill.py`` (60 kills); these tests run it with 1 kill per command, and
check that its version check does catch a half-written version.
"""

from __future__ import annotations

import importlib.util
import random
import shutil
import sys
from pathlib import Path

import pytest

from data.rundir import RunDir
from index.store import live_version

REPO = Path(__file__).resolve().parents[2]


def _bench():
    """benchmarks/bench_kill.py as a module (registered, as its dataclasses need)."""
    if "bench_kill" not in sys.modules:
        spec = importlib.util.spec_from_file_location("bench_kill", REPO / "benchmarks" / "bench_kill.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules["bench_kill"] = module
        spec.loader.exec_module(module)
    return sys.modules["bench_kill"]


def test_kill_points_cover_the_whole_duration_reproducibly() -> None:
    bench = _bench()
    points = bench.kill_points(10.0, 20, random.Random(3))
    assert points == bench.kill_points(10.0, 20, random.Random(3))
    assert all(k * 0.5 <= p < (k + 1) * 0.5 for k, p in enumerate(points))  # one in each 0.5 s slice


def test_version_check_counts_a_half_written_version_and_ignores_staging(tiny_run: Path, tmp_path: Path) -> None:
    """The check the kill benchmark makes after every kill fails on a truncated version folder."""
    bench = _bench()
    run = Path(shutil.copytree(tiny_run, tmp_path / "run"))
    root = run / RunDir.INDEX
    live = live_version(root)
    clean = bench.Tally()
    bench.check_versions(run, clean, "clean")
    assert clean.corrupt_versions == 0 and clean.failures == []

    staging = root / ".v20260101-000000-000000-abcd-x1y2z3_4"  # a writer killed mid-way: ignored
    shutil.copytree(live, staging)
    (staging / RunDir.INDEX_FILE).write_bytes(b"half")
    (root / ".reindex-0123456789abcdef").mkdir()
    ignored = bench.Tally()
    bench.check_versions(run, ignored, "staging")
    assert ignored.corrupt_versions == 0 and ignored.failures == []

    half = root / "v20260101-000000-000000-abcd"  # looks published, but its index file is cut short
    shutil.copytree(live, half)
    data = (half / RunDir.INDEX_FILE).read_bytes()
    (half / RunDir.INDEX_FILE).write_bytes(data[: len(data) // 2])
    corrupt = bench.Tally()
    bench.check_versions(run, corrupt, "half")
    assert corrupt.corrupt_versions == 1 and "v20260101-000000-000000-abcd does not load" in corrupt.failures[0]


@pytest.mark.slow
def test_killed_commands_keep_the_old_version_serving_and_rerun(ml100k_dir: Path, tmp_path: Path) -> None:
    """2 SIGKILLs per command at seeded points: the old version answers, nothing is half-written, reruns publish."""
    bench = _bench()
    tallies = bench.run_kills(tmp_path / "kill", ml100k_dir, kills=1, seed=1, log=lambda *a: None)
    assert set(tallies) == set(bench.COMMANDS)
    for command, tally in tallies.items():
        assert tally.failures == [], (command, tally.failures)
        assert (tally.kills, tally.reruns_completed, tally.corrupt_versions) == (1, 1, 0), command


def test_the_scratch_folder_of_someone_else_is_never_deleted(ml100k_dir: Path, tmp_path: Path) -> None:
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "todo.txt").write_text("mine")
    with pytest.raises(SystemExit, match="not made by bench_kill"):
        _bench().prepare(notes, ml100k_dir)
    assert (notes / "todo.txt").read_text() == "mine"
