"""RunDir: every file of a run directory round trips, missing files are named, staging publishes whole."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import polars as pl
import pytest

from configs import load_config
from data.catalog import catalog_sha256, load_catalog, write_catalog
from data.protocol import Split
from data.rundir import RunDir, owner_alive, owner_record
from errors import CatalogError, CheckpointError


def _catalog(folder: Path, extra_user: bool = False) -> Path:
    items = pl.DataFrame({"item_id": [1, 2, 3], "title": ["Alpha", "Beta", "Gamma"]})
    users, item_ids = [10, 10, 11] + ([12] if extra_user else []), [1, 2, 3] + ([1] if extra_user else [])
    interactions = pl.DataFrame({"user_id": users, "item_id": item_ids, "timestamp": list(range(len(users)))})
    write_catalog(folder, items, interactions)
    return folder


def _names(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


# --- round trips ------------------------------------------------------------------------------------------


def test_config_round_trip(tmp_path: Path) -> None:
    config = load_config("tiny", ["train.epochs=3", "dim=16"])
    run = RunDir(tmp_path / "run")
    run.write_config(config)
    assert run.config_path == tmp_path / "run" / "config.json"
    assert run.read_config() == config
    assert run.read_config() != load_config("tiny")


def test_histories_round_trip_without_the_test_item(tmp_path: Path) -> None:
    # String user ids, ids with leading zeros, and a re-watch (item "007" twice).
    split = Split(user_ids=["u1", "u2"], item_ids=["007", "7", "x"],
                  sequences=[np.array([0, 1, 2, 0]), np.array([2, 1, 0])])
    run = RunDir(tmp_path)
    run.write_histories(split)
    assert run.read_histories() == {"u1": ["007", "7", "x"], "u2": ["x", "7"]}
    # Integer ids stay integers; the order is the sequence's, not the file's row order.
    split = Split(user_ids=[5, 3], item_ids=[10, 20, 30],
                  sequences=[np.array([2, 0, 1, 2]), np.array([1, 2, 0, 1])])
    run.write_histories(split)
    hist = run.read_histories()
    assert hist == {3: [20, 30, 10], 5: [30, 10, 20]}
    assert all(isinstance(i, int) for h in hist.values() for i in h)


def test_id_table_round_trip(tmp_path: Path) -> None:
    run = RunDir(tmp_path)
    run.write_id_table(["b", "a", "007"])
    table = run.read_id_table()
    assert table.ids == ["b", "a", "007"] and table.row("007") == 2
    run.write_id_table([30, 10, 20])
    assert run.read_id_table().ids == [30, 10, 20]


def test_metrics_round_trip(tmp_path: Path) -> None:
    metrics = {"best_epoch": 2, "valid": {"ndcg@10": 0.125}, "test": {"recall@10": 0.5},
               "history": [{"epoch": 0, "loss": 1.5}], "seconds": 3.25}
    run = RunDir(tmp_path)
    run.write_metrics(metrics)
    assert run.read_metrics() == metrics


def test_catalog_ref_round_trip(tmp_path: Path) -> None:
    catalog = _catalog(tmp_path / "catalog")
    run = RunDir(tmp_path / "run")
    run.write_catalog_ref(load_catalog(catalog))
    assert run.catalog_ref() == {"path": str(catalog.resolve()), "sha256": catalog_sha256(catalog)}
    assert run.catalog_changed() is False
    loaded = run.load_catalog()
    assert loaded.root == catalog.resolve() and loaded.items["title"].to_list() == ["Alpha", "Beta", "Gamma"]

    # Moved: the recorded place is empty, the new place (same content) is accepted.
    moved = tmp_path / "elsewhere" / "catalog"
    moved.parent.mkdir()
    shutil.move(catalog, moved)
    assert run.catalog_changed() is None
    with pytest.raises(CatalogError, match="not there .*moved or deleted.*--catalog"):
        run.load_catalog()
    assert run.load_catalog(moved).items.height == 3

    # Re-prepared in place with other data: refused from there, and flagged.
    _catalog(tmp_path / "catalog", extra_user=True)
    assert run.catalog_changed() is True
    with pytest.raises(CatalogError, match="catalog content changed since run .* was trained on it"):
        run.load_catalog()
    with pytest.raises(CatalogError, match="not there"):
        run.load_catalog(tmp_path / "nowhere")


# --- missing and broken files ---------------------------------------------------------------------------


def test_require_names_the_missing_file(tmp_path: Path) -> None:
    run = RunDir(tmp_path / "run")
    with pytest.raises(CheckpointError, match="run directory not found"):
        run.require()
    run.path.mkdir()
    with pytest.raises(CheckpointError, match=re.escape(f"{run.path / 'config.json'}: not found")):
        run.require()
    run.write_config(load_config("tiny"))
    assert not run.is_run()
    with pytest.raises(CheckpointError, match=re.escape(f"{run.path / 'towers.safetensors'}: not found")):
        run.require()
    run.weights_path.write_bytes(b"")
    assert run.require() is run and run.is_run()


@pytest.mark.parametrize("read, name", [
    (RunDir.read_metrics, "metrics.json"),
    (RunDir.catalog_ref, "catalog_ref.json"),
    (RunDir.read_histories, "histories.parquet"),
    (RunDir.read_id_table, "id_table.parquet"),
    (RunDir.read_config, "config.json"),
])
def test_missing_and_corrupt_files_are_named(tmp_path: Path, read, name: str) -> None:
    run = RunDir(tmp_path)
    with pytest.raises(CheckpointError, match=re.escape(f"{tmp_path / name}: not found")):
        read(run)
    (tmp_path / name).write_text("{not json")
    with pytest.raises(CheckpointError, match=re.escape(f"{tmp_path / name}: ")):
        read(run)


def test_config_with_unknown_key_names_the_file(tmp_path: Path) -> None:
    run = RunDir(tmp_path)
    run.write_config(load_config("tiny"))
    data = json.loads(run.config_path.read_text())
    data["train"]["bogus"] = 1
    run.config_path.write_text(json.dumps(data))
    with pytest.raises(CheckpointError, match=re.escape(f"{run.config_path}: ") + ".*unknown key"):
        run.read_config()


# --- staging, publishing, discarding --------------------------------------------------------------------


def test_staging_refuses_to_replace_unless_asked(tmp_path: Path) -> None:
    target = RunDir(tmp_path / "run")
    target.path.mkdir()
    target.write_config(load_config("tiny"))
    with pytest.raises(CheckpointError, match="already holds a towerrec run; .*--overwrite"):
        target.staging()
    other = RunDir(tmp_path / "other")
    other.path.mkdir()
    (other.path / "notes.txt").write_text("x")
    with pytest.raises(CheckpointError, match="already holds files"):
        other.staging()
    with pytest.raises(CheckpointError, match="already holds files and is no towerrec run.*even with --overwrite"):
        other.staging(overwrite=True)  # a folder of other files is never replaced
    (tmp_path / "a-file").write_text("x")
    os.symlink(target.path, tmp_path / "a-link")
    for overwrite in (False, True):
        with pytest.raises(CheckpointError, match="exists and is not a folder"):
            RunDir(tmp_path / "a-file").staging(overwrite=overwrite)
        with pytest.raises(CheckpointError, match="is a symbolic link"):
            RunDir(tmp_path / "a-link").staging(overwrite=overwrite)
    assert _names(tmp_path) == ["a-file", "a-link", "other", "run"]  # no staging folder made for a refusal
    assert (tmp_path / "a-file").read_text() == "x" and _names(other.path) == ["notes.txt"]
    # An empty folder is no run: it may be replaced without --overwrite.
    (tmp_path / "empty").mkdir()
    RunDir(tmp_path / "empty").staging().discard()


def _fake_run(run: RunDir) -> RunDir:
    """A folder that holds what makes a run (its config and weights files), for the staging tests."""
    run.path.mkdir(parents=True, exist_ok=True)
    run.write_config(load_config("tiny"))
    run.weights_path.write_bytes(b"weights")
    return run


def test_staging_and_publish_replace_the_run_whole(tmp_path: Path) -> None:
    target = _fake_run(RunDir(tmp_path / "run"))
    target.write_metrics({"old": True})
    (target.path / "index").mkdir()
    (target.path / "index" / "LIVE").write_text("v1\n")

    old = os.umask(0o022)
    try:
        staged = target.staging(overwrite=True)
    finally:
        os.umask(old)
    assert staged.path.parent == tmp_path and staged.path.name.startswith(".run-")
    assert stat.S_IMODE(staged.path.stat().st_mode) == 0o755  # not mkdtemp's 0700
    assert _names(staged.path) == [RunDir.OWNER]  # who writes it, until it is published
    staged.write_metrics({"old": False})
    staged.write_id_table([1, 2])
    # Until it is published, the existing run is untouched.
    assert target.read_metrics() == {"old": True} and (target.path / "index" / "LIVE").is_file()

    with pytest.raises(CheckpointError, match="already holds a towerrec run"):
        target.publish(staged)  # publishing checks the path again
    target.publish(staged, overwrite=True)
    assert target.read_metrics() == {"old": False}
    assert _names(target.path) == ["id_table.parquet", "metrics.json"]  # nothing of the old run survives
    assert not staged.path.exists()
    assert _names(tmp_path) == ["run"]  # neither the staging folder nor the replaced run is left


def test_publish_into_a_new_place(tmp_path: Path) -> None:
    target = RunDir(tmp_path / "deeper" / "run")
    staged = target.staging()
    assert staged.path.parent == tmp_path / "deeper"
    staged.write_metrics({"a": 1})
    target.publish(staged)
    assert target.read_metrics() == {"a": 1} and _names(tmp_path / "deeper") == ["run"]


def test_discard_removes_the_staging_folder(tmp_path: Path) -> None:
    target = _fake_run(RunDir(tmp_path / "run"))
    target.write_metrics({"kept": True})
    staged = target.staging(overwrite=True)
    staged.write_metrics({"kept": False})
    (staged.path / "index").mkdir()
    staged.discard()
    assert not staged.path.exists()
    assert _names(tmp_path) == ["run"] and target.read_metrics() == {"kept": True}
    staged.discard()  # discarding twice is harmless


# --- staging folders left by killed trainings -------------------------------------------------------------


def _dead_pid() -> int:
    """The pid of a process that has exited (and been reaped)."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def _staging_folder(parent: Path, name: str, record: dict | None, files: tuple[str, ...] = ("metrics.json",),
                    age_s: float = 0.0) -> Path:
    folder = parent / name
    folder.mkdir()
    if record is not None:
        (folder / RunDir.OWNER).write_text(json.dumps(record))
    for f in files:
        (folder / f).write_text("{}")
    if age_s:
        then = time.time() - age_s
        os.utime(folder, (then, then))
    return folder


@pytest.mark.skipif(not Path("/proc/self/stat").is_file(), reason="process start times come from /proc")
def test_next_training_removes_staging_folders_whose_owner_is_gone(tmp_path: Path) -> None:
    me = owner_record()
    assert me["pid"] == os.getpid() and me["start"] and owner_alive(me) is True
    old = RunDir.UNOWNED_STALE_S + 60
    gone = {
        "dead": _staging_folder(tmp_path, ".run-training-dead", dict(me, pid=_dead_pid())),
        # our pid, but a process started at another time: the pid was reused, the owner is gone
        "reused": _staging_folder(tmp_path, ".run-training-reused", dict(me, start="1")),
        "rebooted": _staging_folder(tmp_path, ".run-training-rebooted", dict(me, boot="another-boot")),
        "unowned": _staging_folder(tmp_path, ".run-training-unowned", None, ("config.json", ".x.tmp"), old),
    }
    kept = {
        "live": _staging_folder(tmp_path, ".run-training-live", me),
        "elsewhere": _staging_folder(tmp_path, ".run-training-elsewhere", dict(me, host=me["host"] + "-x")),
        "young": _staging_folder(tmp_path, ".run-training-young", None),  # may be an owner about to record itself
        "foreign": _staging_folder(tmp_path, ".run-training-foreign", None, ("notes.txt",), old),
        "garbled": _staging_folder(tmp_path, ".run-training-garbled", {"pid": "x"}, ("notes.txt",), old),
        "other run": _staging_folder(tmp_path, ".other-training-dead", dict(me, pid=_dead_pid())),
    }
    os.symlink(gone["dead"], tmp_path / ".run-training-link")
    staged = RunDir(tmp_path / "run").staging()
    assert not any(f.exists() for f in gone.values())
    assert all(f.is_dir() and (f / RunDir.OWNER).exists() == (n not in ("young", "foreign")) for n, f in
               kept.items())
    assert (tmp_path / ".run-training-link").is_symlink()  # a link is never followed nor removed
    assert json.loads((staged.path / RunDir.OWNER).read_text()) == me  # the new folder is this process's
    assert RunDir(tmp_path / "run").sweep_staging() == []  # what is left is alive, elsewhere or not ours


def test_staging_folder_of_a_killed_process_is_removed_by_the_next_training(tmp_path: Path) -> None:
    """A process that makes a staging folder and is SIGKILLed leaves it; the next staging on the path removes it."""
    code = ("import os, signal, sys; from data.rundir import RunDir; "
            "RunDir(sys.argv[1]).staging(); os.kill(os.getpid(), signal.SIGKILL)")
    repo = Path(__file__).resolve().parents[2]
    proc = subprocess.Popen([sys.executable, "-c", code, str(tmp_path / "run")], cwd=repo,
                            env=dict(os.environ, PYTHONPATH=str(repo)))
    assert proc.wait(timeout=120) == -signal.SIGKILL
    (left,) = tmp_path.glob(".run-training-*")
    assert json.loads((left / RunDir.OWNER).read_text())["pid"] == proc.pid
    staged = RunDir(tmp_path / "run").staging()
    assert _names(tmp_path) == [staged.path.name]
