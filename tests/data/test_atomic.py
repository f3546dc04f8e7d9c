"""``data.atomic.publish_dir``: a folder is replaced in one step, and nothing is left beside it."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

from data import atomic


def _folder(path: Path, text: str) -> Path:
    path.mkdir()
    (path / "f.txt").write_text(text)
    return path


def test_publish_replaces_a_folder_and_leaves_nothing_beside_it(tmp_path: Path) -> None:
    target = _folder(tmp_path / "out", "old")
    new = _folder(tmp_path / ".out.tmp", "new")
    atomic.publish_dir(new, target)
    assert (target / "f.txt").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_publish_onto_nothing(tmp_path: Path) -> None:
    new = _folder(tmp_path / ".out.tmp", "new")
    atomic.publish_dir(new, tmp_path / "out")
    assert (tmp_path / "out" / "f.txt").read_text() == "new" and not new.exists()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="renameat2 is Linux's")
def test_on_linux_the_swap_is_one_step(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """No rename aside: ``target`` never goes missing, so a crash at any point leaves old or new in place."""
    target = _folder(tmp_path / "out", "old")
    new = _folder(tmp_path / ".out.tmp", "new")

    def no_two_step(*_args):
        raise AssertionError("renamed in two steps")

    monkeypatch.setattr(os, "replace", no_two_step)
    atomic.publish_dir(new, target)
    assert (target / "f.txt").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_two_step_fallback_where_the_swap_is_unsupported(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(atomic, "_exchange", lambda _a, _b: False)
    target = _folder(tmp_path / "out", "old")
    atomic.publish_dir(_folder(tmp_path / ".out.tmp", "new"), target)
    assert (target / "f.txt").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_a_scratch_folder_is_made_anew_only_when_its_owner_made_it(tmp_path: Path) -> None:
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "todo.txt").write_text("mine")
    with pytest.raises(SystemExit, match="not made by bench"):
        atomic.scratch_dir(notes, "bench")
    assert (notes / "todo.txt").read_text() == "mine"
    (tmp_path / "file").write_text("mine")
    with pytest.raises(SystemExit, match="is a file"):
        atomic.scratch_dir(tmp_path / "file", "bench")

    work = atomic.scratch_dir(tmp_path / "work", "bench")
    (work / "old.txt").write_text("left by the last run")
    assert atomic.scratch_dir(work, "bench") == work and not (work / "old.txt").exists()
    with pytest.raises(SystemExit, match="not made by other"):
        atomic.scratch_dir(work, "other")
