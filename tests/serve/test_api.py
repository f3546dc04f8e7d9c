"""The HTTP API over the tiny trained run: answers equal the Python API's, and every bad request is a clear 4xx."""

from __future__ import annotations

import json
import re
from pathlib import Path

import polars as pl
import pytest

from data.catalog import load_catalog
from errors import (
    CatalogError,
    CheckpointError,
    ConfigError,
    DeviceError,
    IndexStateError,
    MediaError,
    ModelLoadError,
    QueryError,
)
from index.store import Manifest, live_version
from serve.api import MAX_BODY, towerrec_status
from serve.media import CatalogMedia


@pytest.fixture(scope="module")
def rec(server):
    return server.live.current.rec


@pytest.fixture(scope="module")
def user(rec):
    """A known user with a long history."""
    return max(sorted(rec.histories), key=lambda u: len(rec.histories[u]))


def _ids(body: dict) -> list:
    return [r["item_id"] for r in body["items"]]


def _post(server, path: str, body):
    return server.client.post(path, json=body)


def test_health_and_version(server, tiny_run: Path) -> None:
    live = live_version(tiny_run / "index")
    manifest = Manifest.read(live / "manifest.json")
    health = server.client.get("/health").json()
    assert health == {"status": "ok", "version": live.name, "reload_error": None}
    version = server.client.get("/version").json()
    assert version["version"] == live.name and version["run"] == str(tiny_run)
    assert version["fingerprint"] == manifest.fingerprint and version["count"] == manifest.count == 150
    assert version["dim"] == 32 and version["factory"] == manifest.factory


@pytest.mark.parametrize("rerank", [False, True])
def test_recommend_known_user_matches_python_api(server, rec, user, rerank) -> None:
    res = _post(server, "/recommend", {"user_id": user, "k": 10, "rerank": rerank})
    assert res.status_code == 200, res.text
    body = res.json()
    want = rec.recommend(user_id=user, k=10, rerank=rerank)
    assert _ids(body) == [r.item_id for r in want] and len(want) == 10
    assert [r["score"] for r in body["items"]] == pytest.approx([r.score for r in want], abs=1e-5)
    assert [r["title"] for r in body["items"]] == [r.title for r in want]
    assert all((r["rerank_score"] is None) != rerank for r in body["items"])
    assert body["version"] == server.live.current.name
    assert body["latency_ms"] > 0
    # A user id given as a string finds the integer user.
    assert _ids(_post(server, "/recommend", {"user_id": str(user), "k": 10, "rerank": rerank}).json()) == _ids(body)


def test_recommend_history_and_exclude(server, rec, user) -> None:
    history = rec.history_of(user)[:5]
    body = _post(server, "/recommend", {"history": history, "k": 7, "rerank": False}).json()
    assert _ids(body) == [r.item_id for r in rec.recommend(history=history, k=7, rerank=False)]
    as_text = _post(server, "/recommend", {"history": [str(i) for i in history], "k": 7, "rerank": False}).json()
    assert _ids(as_text) == _ids(body)
    dropped = _post(server, "/recommend", {"history": history, "k": 7, "rerank": False,
                                           "exclude": _ids(body)[:2]}).json()
    assert _ids(dropped)[:5] == _ids(body)[2:]


def test_recommend_explain(server, rec, user) -> None:
    """explain=true gives each item a reason that cites only the user's history; off by default."""
    body = _post(server, "/recommend", {"user_id": user, "k": 3, "rerank": False, "explain": True}).json()
    want = rec.recommend(user_id=user, k=3, rerank=False, explain=True)
    assert _ids(body) == [r.item_id for r in want]
    history = set(rec.history_of(user))
    for item, r in zip(body["items"], want):
        assert item["reason"] == r.reason and item["reason"].startswith("Because you watched")
        assert item["reason_source"] in ("llm", "template") and item["reason_cites"]
        assert set(item["reason_cites"]) <= history
    plain = _post(server, "/recommend", {"user_id": user, "k": 3, "rerank": False}).json()
    assert all(i["reason"] is None for i in plain["items"])
    bad = _post(server, "/recommend", {"user_id": user, "k": 3, "explain": "yes"})
    assert bad.status_code == 422


def test_filters_match_python_api(server, rec, user) -> None:
    """allow, deny and where (polars SQL over the index's item columns) pass through unchanged."""
    everything = [r.item_id for r in rec.recommend(user_id=user, k=1000, rerank=False)]
    allow, deny = everything[::3][:12], everything[:4]
    where = "title LIKE '%(199%'"  # released in the 1990s
    query = {"user_id": user, "k": 8, "rerank": False, "allow": allow, "deny": deny, "where": where}
    body = _post(server, "/recommend", query).json()
    want = rec.recommend(user_id=user, k=8, rerank=False, allow=allow, deny=deny, where=where)
    assert _ids(body) == [r.item_id for r in want] and body["items"]
    titles = dict(zip(rec.item_ids, rec.titles))
    assert all(i in allow and i not in deny and "(199" in titles[i] for i in _ids(body))


def test_similar_get_and_post(server, rec) -> None:
    item = rec.item_ids[0]
    want = rec.similar(item, k=5)
    got = server.client.get("/similar", params={"item_id": str(item), "k": 5}).json()
    assert _ids(got) == [r.item_id for r in want] and item not in _ids(got)
    assert [r["score"] for r in got["items"]] == pytest.approx([r.score for r in want], abs=1e-5)
    assert got["version"] == server.live.current.name
    posted = _post(server, "/similar", {"item_id": item, "k": 5}).json()
    assert _ids(posted) == _ids(got)
    allow = rec.item_ids[10:20]
    filtered = server.client.get("/similar", params={"item_id": item, "k": 3, "allow": allow}).json()
    assert _ids(filtered) == [r.item_id for r in rec.similar(item, k=3, allow=allow)]
    assert set(_ids(filtered)) <= set(allow)
    where = _post(server, "/similar", {"item_id": item, "k": 3, "deny": _ids(got)[:1],
                                       "where": "title LIKE '%(199%'"}).json()
    assert _ids(where) == [r.item_id for r in rec.similar(item, k=3, deny=_ids(got)[:1], where="title LIKE '%(199%'")]


def test_k_up_to_the_limit(server, rec, user) -> None:
    body = _post(server, "/recommend", {"user_id": user, "k": 1000, "rerank": False}).json()
    # 150 items in the catalog, minus the user's history.
    assert len(body["items"]) == 150 - len(set(rec.history_of(user)))


def test_users_and_history(server, rec, user) -> None:
    first = server.client.get("/users", params={"limit": 7}).json()
    assert first["total"] == len(rec.histories) == 60
    every = server.client.get("/users", params={"limit": 10_000}).json()["users"]
    assert [u["user_id"] for u in every] == sorted(rec.histories)
    assert first["users"] == every[:7]
    assert server.client.get("/users", params={"offset": 7, "limit": 3}).json()["users"] == every[7:10]
    assert all(u["history_length"] == len(rec.histories[u["user_id"]]) for u in every)

    hist = server.client.get(f"/users/{user}/history").json()
    assert hist["user_id"] == user
    assert [i["item_id"] for i in hist["items"]] == rec.history_of(user)
    titles = dict(zip(rec.item_ids, rec.titles))
    assert all(i["title"] == titles[i["item_id"]] for i in hist["items"])


def test_items_and_images(server, tiny_catalog: Path) -> None:
    items = load_catalog(tiny_catalog).items
    with_image = items.filter(pl.col("image_path").is_not_null()).row(0, named=True)
    without = items.filter(pl.col("image_path").is_null()).row(0, named=True)

    item = server.client.get(f"/items/{with_image['item_id']}").json()
    assert item == {"item_id": with_image["item_id"], "title": with_image["title"],
                    "image": f"/items/{with_image['item_id']}/image"}
    res = server.client.get(item["image"])
    assert res.status_code == 200 and res.headers["content-type"] == "image/jpeg"
    assert res.content == (tiny_catalog / with_image["image_path"]).read_bytes()

    assert server.client.get(f"/items/{without['item_id']}").json()["image"] is None
    res = server.client.get(f"/items/{without['item_id']}/image")
    assert res.status_code == 404 and "has no image" in res.json()["error"]
    # The same link the API hands out for results: None where the page shows a placeholder.
    body = _post(server, "/recommend", {"history": [without["item_id"]], "k": 150, "rerank": False}).json()
    assert {r["item_id"] for r in body["items"] if r["image"] is None} == set(
        items.filter(pl.col("image_path").is_null())["item_id"].to_list()) - {without["item_id"]}


def test_page_is_served_self_contained(server) -> None:
    res = server.client.get("/")
    assert res.status_code == 200 and res.headers["content-type"].startswith("text/html")
    page = res.text
    assert "/recommend" in page and "/users" in page
    # Nothing from the network: no absolute URLs in src/href attributes or fetch calls.
    assert "http://" not in page and "https://" not in page and "//cdn" not in page


def test_media_is_confined_to_the_catalog(tmp_path: Path) -> None:
    """Image paths that leave the catalog folder are never served (absolute, '..', symlink out)."""
    root = tmp_path / "catalog"
    (root / "media").mkdir(parents=True)
    secret = tmp_path / "secret.jpg"
    secret.write_bytes(b"secret")
    (root / "media" / "ok.jpg").write_bytes(b"ok")
    (root / "media" / "link.jpg").symlink_to(secret)
    pl.DataFrame({"item_id": [1, 2, 3, 4, 5], "title": list("abcde"),
                  "image_path": ["media/ok.jpg", "../secret.jpg", str(secret), "media/link.jpg", None]}
                 ).write_parquet(root / "items.parquet")
    media = CatalogMedia(root)
    assert media.image_file(1) == root / "media" / "ok.jpg" and media.image_file("1") == media.image_file(1)
    assert [media.image_file(i) for i in (2, 3, 4, 5, 6)] == [None] * 5
    assert CatalogMedia(tmp_path / "absent").image_file(1) is None


LONG = "x" * 3000


@pytest.mark.parametrize(("method", "path", "body", "status", "message"), [
    ("post", "/recommend", {"user_id": 999_999}, 404, "unknown user_id 999999"),
    ("post", "/recommend", {"user_id": "nobody"}, 404, "unknown user_id 'nobody'"),
    ("get", "/users/999999/history", None, 404, "unknown user_id"),
    ("get", "/items/999999", None, 404, "unknown item_id"),
    ("get", "/no/such/route", None, 404, "Not Found"),
    ("get", "/recommend", None, 405, "Method Not Allowed"),
    ("post", "/recommend", {"history": [1, 999_999]}, 400, "unknown item_id 999999 in history"),
    ("post", "/recommend", {"history": []}, 400, "empty history"),
    ("post", "/recommend", {"history": [1], "where": "year >"}, 400, "is not a valid condition"),
    ("post", "/recommend", {"history": [1], "where": "decade > 1990"}, 400, "where: unknown column 'decade'"),
    ("post", "/recommend", {"history": [1], "allow": [999_999]}, 400, "unknown item_id 999999 in allow"),
    ("get", "/similar?item_id=999999", None, 404, "unknown item_id '999999'"),
    ("post", "/similar", {"item_id": 999_999}, 404, "unknown item_id 999999"),
    ("post", "/similar", {"item_id": 1, "where": "no_such > 1"}, 400, "where: unknown column"),
    ("post", "/recommend", b'{"user_id": 1,', 400, "malformed JSON body"),
    ("post", "/recommend", {"user_id": 1, "k": 0}, 422, "k: Input should be greater than or equal to 1"),
    ("post", "/recommend", {"user_id": 1, "k": 1001}, 422, "k: Input should be less than or equal to 1000"),
    ("post", "/recommend", {"user_id": 1, "k": "10"}, 422, "k: Input should be a valid integer"),
    ("post", "/recommend", {"user_id": 1, "k": 2.5}, 422, "k: Input should be a valid integer"),
    ("post", "/recommend", {"user_id": 1, "history": [1]}, 422, "give exactly one of user_id"),
    ("post", "/recommend", {}, 422, "give exactly one of user_id"),
    ("post", "/recommend", {"user_id": 1, "allowed": [1]}, 422, "allowed: Extra inputs are not permitted"),
    ("post", "/recommend", {"user_id": True}, 422, "user_id: ids are integers or non-empty strings"),
    ("post", "/recommend", {"history": "1,2"}, 422, "history: Input should be a valid list"),
    ("post", "/recommend", {"history": [1.5]}, 422, "history.0: ids are integers"),
    ("post", "/recommend", {"user_id": 1, "rerank": "yes"}, 422, "rerank: Input should be a valid boolean"),
    ("post", "/recommend", {"user_id": 1, "where": LONG}, 422, "where: String should have at most 2000"),
    ("post", "/recommend", [1, 2], 422, "Input should be a valid dictionary"),
    ("get", "/similar?k=5", None, 422, "item_id: Field required"),
    ("get", "/similar?item_id=1&k=1001", None, 422, "k: Input should be less than or equal to 1000"),
    ("post", "/similar", {"item_id": 1, "k": 0}, 422, "k: Input should be greater than or equal to 1"),
    ("get", "/users?limit=0", None, 422, "limit: Input should be greater than or equal to 1"),
])
def test_bad_requests_are_clear_4xx(server, method, path, body, status, message) -> None:
    if isinstance(body, bytes):
        res = server.client.post(path, content=body, headers={"content-type": "application/json"})
    elif body is not None:
        res = server.client.request(method, path, json=body)
    else:
        res = server.client.request(method, path)
    assert res.status_code == status, res.text
    assert res.headers["content-type"] == "application/json"
    err = res.json()
    assert err["status"] == status and message in err["error"], err
    assert "\n" not in err["error"]


def test_body_size_limit(server) -> None:
    big = json.dumps({"history": [1] * (MAX_BODY // 2)}).encode()
    assert len(big) > MAX_BODY
    res = server.client.post("/recommend", content=big, headers={"content-type": "application/json"})
    assert res.status_code == 413 and res.json()["error"] == f"request body over {MAX_BODY} bytes"
    # Without a Content-Length (chunked), the body is counted as it arrives.
    res = server.client.post("/recommend", content=iter([big[:40_000], big[40_000:]]),
                             headers={"content-type": "application/json"})
    assert "content-length" not in res.request.headers
    assert res.status_code == 413 and res.json()["status"] == 413
    # A chunked body under the limit is passed on whole.
    small = json.dumps({"history": [1], "k": 3, "rerank": False}).encode()
    res = server.client.post("/recommend", content=iter([small[:5], small[5:]]),
                             headers={"content-type": "application/json"})
    assert res.status_code == 200 and len(res.json()["items"]) == 3


def test_non_json_body_is_415(server) -> None:
    res = server.client.post("/recommend", data={"user_id": "1"})
    assert res.status_code == 415 and "Content-Type: application/json" in res.json()["error"]


@pytest.mark.parametrize(("error", "status"), [
    (QueryError, 400), (ConfigError, 400), (CatalogError, 400), (MediaError, 404), (IndexStateError, 409),
    (CheckpointError, 409), (ModelLoadError, 409), (DeviceError, 409),
])
def test_towerrec_errors_are_4xx(server, rec, user, monkeypatch, error, status) -> None:
    """Whatever towerrec raises while answering is a 4xx with its one-line message, never a 500."""
    assert towerrec_status(error("x")) == status

    def fail(*args, **kwargs):
        raise error("the index\nbroke")

    monkeypatch.setattr(rec, "recommend", fail)
    monkeypatch.setattr(rec, "recommend_each", fail)  # the batched path
    res = _post(server, "/recommend", {"user_id": user})
    assert res.status_code == status and res.json() == {"error": "the index broke", "status": status}


def test_a_bug_is_a_json_500(server, rec, user, monkeypatch) -> None:
    """A bug answers a JSON 500 with a log reference and nothing of the exception (text, type, path)."""
    def bug(*args, **kwargs):
        raise ZeroDivisionError("oops /srv/secret")

    monkeypatch.setattr(rec, "recommend", bug)
    monkeypatch.setattr(rec, "recommend_each", bug)  # the batched path
    res = _post(server, "/recommend", {"user_id": user})
    assert res.status_code == 500 and res.headers["content-type"] == "application/json"
    body = res.json()
    assert set(body) == {"error", "status"} and body["status"] == 500
    assert re.fullmatch(r"internal error \(ref [0-9a-f]{8}\); see the server log", body["error"]), body
