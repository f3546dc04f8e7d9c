"""`prepare --out` never destroys what is there: files, folders of other files and the inputs are refused, an
earlier catalog is replaced only with --overwrite and all at once, and an interrupted prepare leaves it whole."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import polars as pl
import pytest

import cli
import data.catalog
from data.catalog import load_catalog, write_catalog
from data.importers import prepare
from errors import CatalogError

REPO = Path(__file__).resolve().parents[2]
ITEMS = "item_id,title\n1,Alpha\n2,Beta\n3,Gamma\n"
EVENTS = "user_id,item_id,timestamp\n10,1,100\n10,2,200\n11,3,300\n"


def _sources(folder: Path, items: str = ITEMS, events: str = EVENTS) -> tuple[Path, Path]:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "items.csv").write_text(items)
    (folder / "events.csv").write_text(events)
    return folder / "items.csv", folder / "events.csv"


def _prepare(items: Path, events: Path, out: Path, *extra: str) -> int:
    return cli.main(["prepare", "--items", str(items), "--interactions", str(events), "--out", str(out), *extra])


def _error(capsys: pytest.CaptureFixture) -> str:
    """The one line `towerrec prepare` printed on stderr (and nothing on stdout)."""
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in captured.err, captured.err
    assert lines[0].startswith("towerrec prepare: error: ") and not captured.out
    return lines[0]


def _snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` (relative path -> bytes), to show nothing changed."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _catalog(tmp_path: Path) -> tuple[Path, Path, Path]:
    """An earlier catalog at ``tmp_path/cat`` and the sources of a different one (``Delta`` added)."""
    items, events = _sources(tmp_path / "src")
    assert _prepare(items, events, tmp_path / "cat") == 0
    newer = _sources(tmp_path / "src2", items=ITEMS + "4,Delta\n", events=EVENTS + "11,4,400\n")
    return tmp_path / "cat", *newer


# --- what is never replaced ----------------------------------------------------------------------------------


@pytest.mark.parametrize("overwrite", [[], ["--overwrite"]])
def test_folder_of_notes_is_refused_and_kept(tmp_path: Path, capsys: pytest.CaptureFixture, overwrite) -> None:
    items, events = _sources(tmp_path / "src")
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "todo.txt").write_text("buy milk\n")
    assert _prepare(items, events, notes, *overwrite) == 2
    line = _error(capsys)
    assert f"{notes}: holds files that are not a towerrec catalog ('todo.txt')" in line
    assert "never deletes them, even with --overwrite; choose a new or empty folder for --out" in line
    assert _snapshot(notes) == {"todo.txt": b"buy milk\n"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes", "src"]  # no temporary folder left beside


@pytest.mark.parametrize("overwrite", [[], ["--overwrite"]])
def test_out_onto_the_input_csv_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture, overwrite) -> None:
    items, events = _sources(tmp_path / "src")
    assert _prepare(items, events, items, *overwrite) == 2
    assert f"{items}: is the --items input, which a catalog written there would replace" in _error(capsys)
    assert items.is_file() and items.read_text() == ITEMS
    assert sorted(p.name for p in items.parent.iterdir()) == ["events.csv", "items.csv"]  # nothing moved aside


def test_out_onto_a_folder_holding_an_input_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    items, events = _sources(tmp_path / "src")
    before = _snapshot(tmp_path / "src")
    assert _prepare(items, events, tmp_path / "src", "--overwrite") == 2
    assert f"{tmp_path / 'src'}: holds {items}, the --items input" in _error(capsys)
    assert _snapshot(tmp_path / "src") == before


def test_reprepare_from_the_catalogs_own_tables_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """Reading a catalog's own tables to write it again in place would delete them mid-way: refused."""
    cat, _, _ = _catalog(tmp_path)
    capsys.readouterr()
    before = _snapshot(cat)
    assert _prepare(cat / "items.parquet", cat / "interactions.parquet", cat, "--overwrite") == 2
    assert "the --items input, which a catalog written there would replace" in _error(capsys)
    assert _snapshot(cat) == before


def test_media_source_inside_out_is_refused(tmp_path: Path) -> None:
    """write_catalog also guards the media files it copies: an earlier catalog's own media cannot feed its rewrite."""
    items = pl.DataFrame({"item_id": [1], "title": ["a"], "image_path": ["media/a.png"]})
    events = pl.DataFrame({"user_id": [1], "item_id": [1], "timestamp": [5]})
    cat = tmp_path / "cat"
    (cat / "media").mkdir(parents=True)
    (cat / "media" / "a.png").write_bytes(b"not even a png")
    with pytest.raises(CatalogError, match=r"cat: holds .*a\.png, the media file input, which a catalog written"):
        write_catalog(cat, items, events, media={"media/a.png": cat / "media" / "a.png"}, overwrite=True)
    assert _snapshot(cat) == {"media/a.png": b"not even a png"}


@pytest.mark.parametrize("overwrite", [[], ["--overwrite"]])
def test_existing_file_is_never_replaced(tmp_path: Path, capsys: pytest.CaptureFixture, overwrite) -> None:
    items, events = _sources(tmp_path / "src")
    other = tmp_path / "report.txt"
    other.write_text("keep me")
    assert _prepare(items, events, other, *overwrite) == 2
    assert f"{other}: is an existing file, and prepare never replaces a file" in _error(capsys)
    assert other.read_text() == "keep me"


def test_out_below_a_file_is_refused(tmp_path: Path) -> None:
    items, events = _sources(tmp_path / "src")
    (tmp_path / "report.txt").write_text("x")
    with pytest.raises(CatalogError, match=r"cannot create a catalog there: .*report\.txt is a file, not a folder"):
        prepare("generic", tmp_path / "report.txt" / "cat", items=items, interactions=events)
    assert (tmp_path / "report.txt").read_text() == "x"


def test_sequences_out_onto_its_source_file_is_refused(tmp_path: Path) -> None:
    seq = tmp_path / "user_sequence.txt"
    seq.write_text("u1 1 2 3\n")
    with pytest.raises(CatalogError, match="is the --src input"):
        prepare("sequences", seq, src=str(seq), overwrite=True)
    assert seq.read_text() == "u1 1 2 3\n"


# --- what may be replaced, and how ---------------------------------------------------------------------------


def test_earlier_catalog_needs_overwrite(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    cat, items, events = _catalog(tmp_path)
    capsys.readouterr()
    before = _snapshot(cat)
    assert _prepare(items, events, cat) == 2
    assert _error(capsys).endswith(f"{cat}: already holds a catalog; pass --overwrite to replace it, or choose a new "
                                   "or empty folder for --out")
    assert _snapshot(cat) == before

    assert _prepare(items, events, cat, "--overwrite") == 0
    assert load_catalog(cat).items["title"].to_list() == ["Alpha", "Beta", "Gamma", "Delta"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cat", "src", "src2"]  # the old one is gone, no temp


def test_overwrite_refuses_a_catalog_holding_other_files(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """A catalog folder the user also put files in is theirs: --overwrite would delete those files, so it refuses."""
    cat, items, events = _catalog(tmp_path)
    (cat / "notes.md").write_text("results of run 3")
    (cat / "media").mkdir()
    before = _snapshot(cat)
    capsys.readouterr()
    assert _prepare(items, events, cat, "--overwrite") == 2
    assert f"{cat}: holds files that are not a towerrec catalog ('notes.md')" in _error(capsys)
    assert _snapshot(cat) == before


def test_a_folder_with_only_part_of_a_catalog_is_not_one(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """Catalog names without both tables (here a bare media/ folder of the user's images) are not a catalog."""
    items, events = _sources(tmp_path / "src")
    out = tmp_path / "out"
    (out / "media").mkdir(parents=True)
    (out / "media" / "cover.png").write_bytes(b"png")
    assert _prepare(items, events, out, "--overwrite") == 2
    assert f"{out}: holds files that are not a towerrec catalog ('media')" in _error(capsys)
    assert _snapshot(out) == {"media/cover.png": b"png"}


def test_empty_folder_is_used(tmp_path: Path) -> None:
    items, events = _sources(tmp_path / "src")
    (tmp_path / "empty").mkdir()
    assert _prepare(items, events, tmp_path / "empty") == 0
    assert load_catalog(tmp_path / "empty").items.height == 3


def test_link_to_an_earlier_catalog_replaces_the_folder_it_points_to(tmp_path: Path) -> None:
    cat, items, events = _catalog(tmp_path)
    link = tmp_path / "current"
    link.symlink_to(cat, target_is_directory=True)
    prepare("generic", link, items=items, interactions=events, overwrite=True)
    assert link.is_symlink() and link.resolve() == cat.resolve()
    assert load_catalog(cat).items.height == 4


def test_library_write_catalog_refuses_an_earlier_catalog_without_overwrite(tmp_path: Path) -> None:
    events = pl.DataFrame({"user_id": [1], "item_id": [1], "timestamp": [5]})
    write_catalog(tmp_path / "cat", pl.DataFrame({"item_id": [1], "title": ["a"]}), events)
    with pytest.raises(CatalogError, match="already holds a catalog; pass --overwrite"):
        write_catalog(tmp_path / "cat", pl.DataFrame({"item_id": [1], "title": ["b"]}), events)
    assert load_catalog(tmp_path / "cat").items["title"].to_list() == ["a"]
    write_catalog(tmp_path / "cat", pl.DataFrame({"item_id": [1], "title": ["b"]}), events, overwrite=True)
    assert load_catalog(tmp_path / "cat").items["title"].to_list() == ["b"]


# --- interruptions -------------------------------------------------------------------------------------------


def test_interrupted_prepare_leaves_the_earlier_catalog(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cat, items, events = _catalog(tmp_path)
    before = _snapshot(cat)

    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(data.catalog, "check_media", interrupt)  # after the tables are validated, before publishing
    with pytest.raises(KeyboardInterrupt):
        prepare("generic", cat, items=items, interactions=events, overwrite=True)
    assert _snapshot(cat) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cat", "src", "src2"]  # the temporary folder is removed


KILLED_PREPARE = """
import sys, time
from pathlib import Path
sys.path.insert(0, {repo!r})
import data.catalog

def stall(*args, **kwargs):  # the new catalog is half-built beside the old one: say so, then wait to be killed
    Path({marker!r}).touch()
    time.sleep(120)

data.catalog.check_media = stall
import cli
sys.exit(cli.main(["prepare", "--items", {items!r}, "--interactions", {events!r}, "--out", {out!r}, "--overwrite"]))
"""


def test_killed_prepare_leaves_the_earlier_catalog_whole(tmp_path: Path) -> None:
    cat, items, events = _catalog(tmp_path)
    before = _snapshot(cat)
    marker = tmp_path / "stalled"
    script = KILLED_PREPARE.format(repo=str(REPO), marker=str(marker), items=str(items), events=str(events),
                                   out=str(cat))
    proc = subprocess.Popen([sys.executable, "-c", script], cwd=tmp_path)
    try:
        deadline = time.monotonic() + 60
        while not marker.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert marker.exists(), f"prepare never reached the media check (exit code {proc.poll()})"
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert _snapshot(cat) == before
    assert load_catalog(cat).items.height == 3
    # The half-built folder stays beside it under a hidden name; it does not block the next prepare.
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".cat-")]
    assert prepare("generic", cat, items=items, interactions=events, overwrite=True).items.height == 4
