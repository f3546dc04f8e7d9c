"""``/health``'s ``reload_error`` and the reload log: an error lasts only while LIVE asks for a broken version."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from data.rundir import RunDir
from index.store import set_live, version_name
from serve.api import create_app
from serve.live import LiveRecommender
from serve.media import CatalogMedia


@pytest.fixture
def run_copy(tiny_run: Path, tmp_path: Path) -> Path:
    """A copy of the tiny run whose ``LIVE`` pointer the test may move."""
    return Path(shutil.copytree(tiny_run, tmp_path / "run"))


def copy_version(run: Path, name: str, broken: bool = False) -> str:
    """A new version folder copied from ``name`` (same vectors, so it loads); ``broken``: its FAISS file removed."""
    new = version_name()
    shutil.copytree(run / "index" / name, run / "index" / new)
    if broken:
        (run / "index" / new / RunDir.INDEX_FILE).unlink()
    return new


def point_live(run: Path, name: str) -> None:
    """Write ``name`` into ``LIVE`` as an operator would, whether or not such a version exists."""
    (run / "index" / RunDir.LIVE).write_text(name + "\n")


@pytest.fixture
def served(run_copy: Path):
    """``(live, client)``: the run served in-process with no watcher thread; the test calls ``live.check()``."""
    live = LiveRecommender(run_copy, device="cpu", poll_s=0)
    with TestClient(create_app(live, CatalogMedia.for_run(run_copy), watch=False)) as client:
        yield live, client


@pytest.mark.parametrize("kind", ["missing", "broken"])
def test_reload_error_clears_when_live_points_back(run_copy: Path, served, kind: str) -> None:
    live, client = served
    good = live.current.name
    bad = "v20000101-000000-000000-dead" if kind == "missing" else copy_version(run_copy, good, broken=True)
    point_live(run_copy, bad)
    assert live.check() is False
    health = client.get("/health").json()
    assert health["version"] == good and bad in health["reload_error"]

    set_live(run_copy / "index", good)  # the operator rolls LIVE back
    assert live.check() is False  # nothing to load: the version asked for is the one served
    assert client.get("/health").json() == {"status": "ok", "version": good, "reload_error": None}

    point_live(run_copy, bad)  # asked for again: tried again, and reported again
    assert live.check() is False
    assert bad in client.get("/health").json()["reload_error"]


def test_reload_error_clears_when_a_good_version_is_published(run_copy: Path, served) -> None:
    live, client = served
    old = live.current.name
    point_live(run_copy, copy_version(run_copy, old, broken=True))
    live.check()
    assert client.get("/health").json()["reload_error"] is not None
    new = copy_version(run_copy, old)
    set_live(run_copy / "index", new)
    assert live.check() is True
    assert client.get("/health").json() == {"status": "ok", "version": new, "reload_error": None}


def test_reload_log_levels(run_copy: Path, served, caplog: pytest.LogCaptureFixture) -> None:
    """A routine reload logs at INFO only; a failed one at ERROR; pointing LIVE back logs at INFO only."""
    live, _client = served
    old = live.current.name
    caplog.set_level(logging.DEBUG, logger="serve.live")

    new = copy_version(run_copy, old)
    set_live(run_copy / "index", new)
    assert live.check() is True
    routine = [r for r in caplog.records if r.name == "serve.live"]
    assert any(new in r.getMessage() and "now serving" in r.getMessage() for r in routine)
    assert all(r.levelno == logging.INFO for r in routine), [(r.levelname, r.getMessage()) for r in routine]

    caplog.clear()
    bad = copy_version(run_copy, new, broken=True)
    set_live(run_copy / "index", bad)
    assert live.check() is False
    failed = [r for r in caplog.records if r.name == "serve.live"]
    assert [r.levelno for r in failed] == [logging.ERROR] and bad in failed[0].getMessage()

    caplog.clear()
    set_live(run_copy / "index", new)
    assert live.check() is False and live.reload_error is None
    back = [r for r in caplog.records if r.name == "serve.live"]
    assert back and all(r.levelno == logging.INFO for r in back)


@pytest.mark.parametrize("pointer", ["../..", "/etc", "", ".v-staging"])
def test_a_live_pointer_outside_the_index_folder_is_never_loaded(run_copy: Path, served, pointer: str,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    live, client = served
    good = live.current.name
    loads: list[str] = []
    monkeypatch.setattr(live, "_load", lambda name: loads.append(name))
    point_live(run_copy, pointer)
    assert live.check() is False
    assert loads == []  # refused before any load is tried
    health = client.get("/health").json()
    assert health["version"] == good and "LIVE" in health["reload_error"]
    set_live(run_copy / "index", good)
    assert live.check() is False
    assert client.get("/health").json()["reload_error"] is None


@pytest.mark.parametrize("version", ["../../etc", "/tmp", ".hidden", "a/b"])
def test_a_named_version_must_be_a_folder_of_the_index(tiny_run: Path, version: str) -> None:
    from errors import IndexStateError
    from index.recommender import Recommender

    with pytest.raises(IndexStateError, match="not an index version name"):
        Recommender.load(tiny_run, device="cpu", version=version)
