"""Dynamic batching of POST /recommend (serve/batching.py): batched answers equal one-at-a-time answers, a bad
request fails alone, versions are kept across a reload, and a lone request does not wait for the window."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from errors import ConfigError, QueryError
from index.results import Results
from rerank import Pipeline
from serve.batching import Batcher


def _bodies(rec: Pipeline) -> list[dict]:
    users = sorted(rec.histories)[:12]
    items = list(rec.item_ids)
    bodies = [{"user_id": u, "k": 3 + i % 5} for i, u in enumerate(users)]
    bodies += [{"history": items[i:i + 4], "k": 10} for i in range(0, 24, 6)]
    bodies += [{"user_id": users[0], "k": 5, "deny": items[:30]}, {"user_id": users[1], "k": 4, "allow": items[:40]},
               {"history": items[5:8], "k": 6, "where": "year >= 1995"}, {"user_id": users[2], "exclude": items[:10]}]
    return bodies


def test_batched_answers_equal_one_at_a_time(server, tiny_run: Path) -> None:
    rec = Pipeline.load(tiny_run, device="cpu")
    bodies = _bodies(rec)
    expected = [[r.item_id for r in rec.recommend(**b, rerank=False)] for b in bodies]
    before = (server.batcher.batches, server.batcher.requests)
    start = threading.Barrier(len(bodies))

    def post(body: dict):
        start.wait()
        return server.client.post("/recommend", json={**body, "rerank": False})

    with ThreadPoolExecutor(len(bodies)) as pool:
        answers = list(pool.map(post, bodies))
    assert [a.status_code for a in answers] == [200] * len(bodies)
    for body, a, want in zip(bodies, answers, expected):
        got = [x["item_id"] for x in a.json()["items"]]
        assert got == want, body
        assert a.json()["version"] == server.live.current.name
    batches = server.batcher.batches - before[0]
    assert server.batcher.requests - before[1] == len(bodies) and batches < len(bodies)  # some shared a forward


def test_a_bad_request_fails_alone(server) -> None:
    user = server.client.get("/users").json()["users"][0]["user_id"]
    bodies = [{"user_id": user, "k": 5}, {"history": ["no-such-item"], "k": 5}, {"user_id": user, "where": "nope("},
              {"history": [], "k": 5}, {"user_id": user, "k": 7}]
    start = threading.Barrier(len(bodies))

    def post(body: dict):
        start.wait()
        return server.client.post("/recommend", json={**body, "rerank": False})

    with ThreadPoolExecutor(len(bodies)) as pool:
        answers = list(pool.map(post, bodies))
    assert [a.status_code for a in answers] == [200, 400, 400, 400, 200]
    assert len(answers[0].json()["items"]) == 5 and len(answers[4].json()["items"]) == 7
    assert "no-such-item" in answers[1].json()["error"] and "empty history" in answers[3].json()["error"]


@dataclass
class _Rec:
    """A stand-in Pipeline that records how it was called, and where."""

    name: str
    calls: list = field(default_factory=list)
    threads: set = field(default_factory=set)

    def recommend_each(self, calls, started):
        self.calls.append(len(calls))
        self.threads.add(threading.current_thread().name)
        time.sleep(0.02)  # a forward pass: later requests queue meanwhile
        return [QueryError("bad") if c.get("bad") else Results([], self.name, 0.0) for c in calls]


@dataclass
class _Served:
    rec: _Rec
    lock: threading.Lock = field(default_factory=threading.Lock)


def _submit_many(batcher: Batcher, served_of, n: int, items: int = 1):
    out = [None] * n

    def one(i):
        try:
            out[i] = batcher.submit(served_of(i), {"i": i, "bad": i == 3}, items)
        except QueryError as err:
            out[i] = err

    threads = [threading.Thread(target=one, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
        time.sleep(0.001)
    for t in threads:
        t.join()
    return out


def test_batches_keep_each_requests_version_and_errors() -> None:
    old, new = _Served(_Rec("v1")), _Served(_Rec("v2"))
    batcher = Batcher(max_batch=8, max_wait_ms=50)
    out = _submit_many(batcher, lambda i: old if i % 2 else new, 12)
    batcher.stop()
    assert isinstance(out[3], QueryError)
    assert all(r.version == ("v1" if i % 2 else "v2") for i, r in enumerate(out) if i != 3)
    assert sum(old.rec.calls) + sum(new.rec.calls) == 12 and max(old.rec.calls + new.rec.calls) > 1
    assert old.rec.threads | new.rec.threads == {"towerrec-batcher"}  # the towers run in the worker only


def test_batch_limits() -> None:
    served = _Served(_Rec("v"))
    batcher = Batcher(max_batch=3, max_wait_ms=200)
    _submit_many(batcher, lambda i: served, 10)
    assert max(served.rec.calls) <= 3 and sum(served.rec.calls) == 10
    items = _Served(_Rec("v"))
    batcher = Batcher(max_batch=32, max_wait_ms=200, max_items=100)
    _submit_many(batcher, lambda i: items, 10, items=40)  # two requests' histories fit the item limit
    batcher.stop()
    assert max(items.rec.calls) <= 2 and sum(items.rec.calls) == 10
    for bad in ({"max_batch": 0}, {"max_wait_ms": -1}, {"max_items": 0}, {"max_batch": True}):
        with pytest.raises(ConfigError):
            Batcher(**bad)


def test_a_lone_request_does_not_wait_for_the_window() -> None:
    served = _Served(_Rec("v"))
    batcher = Batcher(max_batch=32, max_wait_ms=1000)
    t0 = time.perf_counter()
    for _ in range(3):
        batcher.submit(served, {}, 1)
    batcher.stop()
    assert time.perf_counter() - t0 < 0.5  # three lone requests, each answered at once (not after 1 s)
    # An announced request is waited for, but never longer than the window.
    batcher = Batcher(max_batch=32, max_wait_ms=100)
    with batcher.coming():  # announced, never submitted
        t0 = time.perf_counter()
        batcher.submit(served, {}, 1)
        waited = time.perf_counter() - t0
    batcher.stop()
    assert 0.08 < waited < 0.5
