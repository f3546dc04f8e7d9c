"""Hot reload: a version published while queries run is swapped in whole, with no errors and no mixed answers."""

from __future__ import annotations

import dataclasses
import shutil
import threading
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import numpy as np
import pytest

from index.recommender import Recommender
from index.store import build_faiss, live_version, read_version, write_version


@pytest.fixture
def run_copy(tiny_run: Path, tmp_path: Path) -> Path:
    """A copy of the tiny run that the test may publish new index versions to."""
    return Path(shutil.copytree(tiny_run, tmp_path / "run"))


def publish(run: Path, seed: int, fingerprint: str | None = None, base: str | None = None) -> str:
    """Publish a new live version whose item vectors are those of ``base`` (default: live) shuffled among items.

    The towers and items stay the same, so the version loads, but its answers differ from the old one's.
    ``fingerprint`` overrides the manifest's (a version built for other towers, which must not load).
    """
    index_root = run / "index"
    folder = index_root / base if base else live_version(index_root)
    index, items, manifest = read_version(folder)
    ids = items["faiss_id"].to_numpy()
    vectors = np.stack([index.reconstruct(int(f)) for f in ids])  # (N, D)
    shuffled = vectors[np.random.default_rng(seed).permutation(len(ids))]
    manifest = dataclasses.replace(manifest, fingerprint=fingerprint or manifest.fingerprint)
    keep = shuffled if (folder / "vectors.npy").is_file() else None
    return write_version(index_root, build_faiss(shuffled, ids, "Flat"), items, manifest, vectors=keep).name


def wait_for(condition: Callable[[], bool], what: str, timeout: float = 90.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


def expected_answers(run: Path, version: str, users: list) -> dict:
    """Each user's top-10 (ids, scores) from an independently loaded Recommender on ``version``."""
    rec = Recommender.load(run, device="cpu", version=version)
    return {u: [(r.item_id, r.score) for r in rec.recommend(user_id=u, k=10, rerank=False)] for u in users}


def test_hot_reload_under_load(run_copy: Path, serve_run) -> None:
    """1,000 queries from 8 threads while a version is published: no errors, each answer from one version.

    Queries 0..599 run from the start; the version is published once 300 have been answered, so the reload
    (loading the new version beside the old one) happens under load. Queries 600..999 wait until the server
    has swapped, so every one of them must come from the new version.
    """
    n_total, n_gated, n_publish = 1000, 600, 300
    with serve_run(run_copy, poll_s=0.05) as srv:
        old = srv.live.current.name
        users = srv.live.current.users[:20]
        lock, swapped = threading.Lock(), threading.Event()
        next_job = [0]
        answers: list[tuple[int, int, object, str, list]] = []  # (thread, job, user, version, [(id, score)])
        errors: list[str] = []

        def worker(thread: int) -> None:
            with httpx.Client(base_url=srv.url, timeout=120) as client:
                while True:
                    with lock:
                        job = next_job[0]
                        if job >= n_total:
                            return
                        next_job[0] += 1
                    if job >= n_gated and not swapped.wait(120):
                        errors.append(f"job {job}: the server never swapped")
                        return
                    user = users[job % len(users)]
                    try:
                        res = client.post("/recommend", json={"user_id": user, "k": 10, "rerank": False})
                    except httpx.HTTPError as err:
                        errors.append(f"job {job}: {err!r}")
                        continue
                    if res.status_code != 200:
                        errors.append(f"job {job}: {res.status_code} {res.text}")
                        continue
                    body = res.json()
                    with lock:
                        answers.append((thread, job, user, body["version"],
                                        [(r["item_id"], r["score"]) for r in body["items"]]))

        threads = [threading.Thread(target=worker, args=(t,)) for t in range(8)]
        for t in threads:
            t.start()
        try:
            wait_for(lambda: len(answers) >= n_publish or errors, "the first answers")
            new = publish(run_copy, seed=1)  # while queries run
            wait_for(lambda: srv.live.current.name == new, "the server to swap to the new version")
        finally:
            swapped.set()
            for t in threads:
                t.join()
        assert srv.client.get("/version").json()["version"] == new

    assert errors == []
    assert len(answers) == n_total
    want = {old: expected_answers(run_copy, old, users), new: expected_answers(run_copy, new, users)}
    assert all(want[old][u] != want[new][u] for u in users)  # the two versions tell answers apart
    for _thread, job, user, version, got in answers:
        assert version in want, (job, version)
        assert [i for i, _ in got] == [i for i, _ in want[version][user]], (job, version)
        np.testing.assert_allclose([s for _, s in got], [s for _, s in want[version][user]], atol=1e-5)
        if job >= n_gated:
            assert version == new, (job, version)
    by_version = {v: sum(a[3] == v for a in answers) for v in want}
    assert by_version[old] >= n_publish and by_version[new] >= n_total - n_gated
    for thread in range(8):  # within one client, once the new version answered, the old one never does
        seq = [a[3] for a in sorted(answers, key=lambda a: a[1]) if a[0] == thread]
        assert seq == sorted(seq, key=lambda v: v == new), thread


class GateLock:
    """Stands in for a version's query lock: records that a query reached it and holds it until released."""

    def __init__(self):
        self.reached, self.open = threading.Event(), threading.Event()

    def __enter__(self):
        self.reached.set()
        assert self.open.wait(60)

    def __exit__(self, *exc):
        return False


def test_in_flight_query_finishes_on_the_old_version(run_copy: Path, serve_run) -> None:
    with serve_run(run_copy, poll_s=0.05) as srv:
        old = srv.live.current
        user = old.users[0]
        gate = GateLock()
        object.__setattr__(old, "lock", gate)  # the old version's next query waits at the gate
        result: dict = {}

        def query() -> None:
            with httpx.Client(base_url=srv.url, timeout=120) as client:
                result["res"] = client.post("/recommend", json={"user_id": user, "k": 10, "rerank": False})

        thread = threading.Thread(target=query)
        thread.start()
        try:
            assert gate.reached.wait(60)  # in flight on the old version
            new = publish(run_copy, seed=1)
            wait_for(lambda: srv.live.current.name == new, "the server to swap to the new version")
            fresh = srv.client.post("/recommend", json={"user_id": user, "k": 10, "rerank": False}).json()
            assert fresh["version"] == new
        finally:
            gate.open.set()
            thread.join()
        late = result["res"].json()
        assert late["version"] == old.name
        assert [r["item_id"] for r in late["items"]] == [r.item_id for r in old.rec.recommend(user_id=user, k=10, rerank=False)]
        assert [r["item_id"] for r in late["items"]] != [r["item_id"] for r in fresh["items"]]


def test_a_version_that_cannot_load_is_not_served(run_copy: Path, serve_run) -> None:
    with serve_run(run_copy, poll_s=0.05) as srv:
        old = srv.live.current.name
        user = srv.live.current.users[0]
        query = {"user_id": user, "k": 10, "rerank": False}
        before = srv.client.post("/recommend", json=query).json()
        assert before["version"] == old

        bad = publish(run_copy, seed=2, fingerprint="0" * 64, base=old)  # built for other towers
        wait_for(lambda: srv.client.get("/health").json()["reload_error"] is not None, "the failed reload")
        health = srv.client.get("/health").json()
        assert health["version"] == old and bad in health["reload_error"]
        assert "fingerprint" in health["reload_error"]
        still = srv.client.post("/recommend", json=query).json()
        assert still["version"] == old and still["items"] == before["items"]

        (run_copy / "index" / "LIVE").unlink()  # no pointer at all: keep serving what is loaded
        time.sleep(0.3)
        assert srv.client.get("/health").json()["version"] == old

        good = publish(run_copy, seed=3, base=old)
        wait_for(lambda: srv.live.current.name == good, "the next good version")
        health = srv.client.get("/health").json()
        assert health == {"status": "ok", "version": good, "reload_error": None}
        assert srv.client.post("/recommend", json=query).json()["version"] == good
