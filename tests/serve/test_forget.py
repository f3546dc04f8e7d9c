"""The right to erasure: ``forget`` leaves no file of the run or the catalog holding the user's id (the tombstone
lists hold a salted hash), imports and trainings honour the tombstones, and a server stops knowing the user."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import polars as pl
import pytest

import cli
from data.catalog import load_catalog, write_catalog
from data.forget import forget
from data.rundir import RunDir
from data.tombstones import Tombstones
from errors import QueryError

VICTIM = "listener-017-qz"  # string ids: a byte search for the id cannot match by accident


def _name(u: int) -> str:
    return f"listener-{u:03d}-qz"


@pytest.fixture(scope="module")
def named_catalog(synthetic_media, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The synthetic catalog with string user ids, and the interactions as a CSV export (for re-imports)."""
    folder = tmp_path_factory.mktemp("forget")
    interactions = synthetic_media.interactions.with_columns(
        pl.col("user_id").map_elements(_name, return_dtype=pl.Utf8))
    interactions.write_csv(folder / "events.csv")
    out = folder / "catalog"
    write_catalog(out, synthetic_media.items, interactions, synthetic_media.media, meta={"source": "tests"})
    return out


@pytest.fixture(scope="module")
def trained(named_catalog: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from configs import load_config
    from index.build import build_index
    from train.loop import train

    run = tmp_path_factory.mktemp("forget-run") / "run"
    train(load_config("tiny", ["train.epochs=1"]), named_catalog, run, progress=False)
    build_index(run, progress=False)
    return run


@pytest.fixture
def copies(named_catalog: Path, trained: Path, tmp_path: Path) -> tuple[Path, Path]:
    """A run and its catalog of the test's own (the run's catalog record points at the copy)."""
    catalog, run = tmp_path / "catalog", tmp_path / "run"
    shutil.copytree(named_catalog, catalog)
    shutil.copytree(trained, run)
    ref = RunDir(run).catalog_ref()
    (run / RunDir.CATALOG_REF).write_text(json.dumps({"path": str(catalog.resolve()), "sha256": ref["sha256"]}))
    return run, catalog


def holders(folders: list[Path], user_id: str) -> list[str]:
    """Files that hold ``user_id``: in any Parquet cell (the files are compressed), or anywhere in the bytes."""
    found = []
    for folder in folders:
        for path in sorted(p for p in folder.rglob("*") if p.is_file()):
            if path.suffix == ".parquet":
                table = pl.read_parquet(path)
                cells = [table[c].explode() if table[c].dtype == pl.List else table[c] for c in table.columns]
                if any(user_id in c.to_list() for c in cells if c.dtype == pl.Utf8):
                    found.append(str(path))
            elif user_id.encode() in path.read_bytes():
                found.append(str(path))
    return found


def salted(folder: Path, user_id: str) -> bool:
    data = json.loads((folder / "tombstones.json").read_text())
    return any(hashlib.sha256(f"{salt}\0{user_id}".encode()).hexdigest() in hashes
               for salt, hashes in data["users"].items())


def test_forget_leaves_no_file_holding_the_user(copies, capsys) -> None:
    run, catalog = copies
    resume = RunDir(run).resume_path
    resume.write_bytes(b"saved training windows")  # a resumable state is training data too
    assert holders([run, catalog], VICTIM)  # the check finds the user before
    before = load_catalog(catalog).interactions
    n = int((before["user_id"] == VICTIM).sum())
    assert cli.main(["forget", "--run", str(run), "--user", VICTIM, "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["catalog_interactions"] == n > 0 and out["history_rows"] > 0 and out["resume_state_removed"]
    assert holders([run, catalog], VICTIM) == []
    assert not resume.exists()
    assert salted(run, VICTIM) and salted(catalog, VICTIM)  # the lists hold a salted hash instead
    after = RunDir(run).load_catalog()  # the run's record follows the new catalog version
    assert VICTIM not in after.interactions["user_id"].to_list()
    assert after.interactions.height == before.height - n
    assert VICTIM not in RunDir(run).read_histories() and _name(18) in RunDir(run).read_histories()
    assert json.loads((catalog / "catalog.json").read_text())["interactions"] == before.height - n
    assert not [p for p in catalog.parent.iterdir() if p.name.startswith(".")]  # no version left behind
    # Erased already, or never there: one clear error, exit code 2, nothing written.
    assert cli.main(["forget", "--run", str(run), "--user", VICTIM]) == 2
    assert "not in run" in capsys.readouterr().err
    with pytest.raises(QueryError, match="nobody"):
        forget(run, "nobody")


def test_imports_and_trainings_honour_the_tombstones(copies, named_catalog: Path, tmp_path: Path) -> None:
    run, catalog = copies
    forget(run, VICTIM)
    events = named_catalog.parent / "events.csv"
    items = tmp_path / "items.parquet"
    load_catalog(named_catalog).items.drop("image_path", "audio_path").write_parquet(items)
    reimport = ["prepare", "--items", str(items), "--interactions", str(events)]
    # The same export, imported again over the catalog: the user stays out, and stays listed.
    assert cli.main([*reimport, "--out", str(catalog), "--overwrite"]) == 0
    assert VICTIM not in pl.read_parquet(catalog / "interactions.parquet")["user_id"].to_list()
    assert VICTIM in Tombstones.of(catalog)
    # Into a new folder, with the run's list.
    fresh = tmp_path / "fresh"
    assert cli.main([*reimport, "--out", str(fresh), "--tombstones", str(run / "tombstones.json")]) == 0
    assert VICTIM not in pl.read_parquet(fresh / "interactions.parquet")["user_id"].to_list()
    assert cli.main([*reimport, "--out", str(tmp_path / "x"), "--tombstones", str(tmp_path / "none.json")]) == 2
    # Re-fine-tuning from the run on a catalog that still holds the user (an old copy): the run's list wins.
    new = tmp_path / "new-run"
    assert cli.main(["train", "--resume-from", str(run), "--catalog", str(named_catalog), "--run", str(new),
                     "--set", "train.epochs=1", "--quiet"]) == 0
    assert VICTIM not in RunDir(new).read_histories() and VICTIM in Tombstones.of(new)
    assert holders([new], VICTIM) == []


def test_a_served_user_is_unknown_after_forget(copies, serve_run) -> None:
    run, _ = copies
    body = {"user_id": VICTIM, "k": 3}
    with serve_run(run, poll_s=0.05) as s:  # forget from the CLI: the watcher reloads within a poll period
        assert s.client.post("/recommend", json=body).status_code == 200
        assert s.client.delete(f"/users/{VICTIM}").status_code == 403  # off unless --allow-forget
        version = s.live.current
        forget(run, VICTIM)
        for _ in range(200):
            if s.live.current is not version:
                break
            __import__("time").sleep(0.05)
        assert s.client.post("/recommend", json=body).status_code == 404
        assert s.client.get(f"/users/{VICTIM}/history").status_code == 404
    other = _name(18)
    with serve_run(run, allow_forget=True) as s:  # over HTTP, behind the flag: 404 from the answer on
        r = s.client.delete(f"/users/{other}")
        assert r.status_code == 200 and r.json()["history_rows"] > 0
        assert s.client.post("/recommend", json={"user_id": other, "k": 3}).status_code == 404
        assert s.client.delete(f"/users/{other}").status_code == 404
        assert s.client.post("/recommend", json={"user_id": _name(19), "k": 3}).status_code == 200
    assert RunDir(run).catalog_ref()["sha256"] == __import__("data.catalog").catalog.catalog_sha256(
        RunDir(run).catalog_ref()["path"])
