"""Retired items over HTTP: an item reindexed away (kept as a row for old histories, never recommended) is
never a 500, whether it is the whole history, the item of ``/similar``, or part of a known user's history."""

from __future__ import annotations

import shutil
from pathlib import Path

import polars as pl
import pytest
from fastapi.testclient import TestClient

from data.catalog import load_catalog, write_catalog
from index.reindex import reindex
from serve.api import create_app
from serve.live import LiveRecommender
from serve.media import CatalogMedia


@pytest.fixture(scope="module")
def retired_run(tiny_run: Path, tiny_catalog: Path, tmp_path_factory) -> tuple[Path, int]:
    """A copy of the tiny run reindexed against its catalog minus the most rated item: ``(run, retired id)``."""
    root = tmp_path_factory.mktemp("retired")
    cat = load_catalog(tiny_catalog)
    popular = cat.interactions.group_by("item_id").len().sort(["len", "item_id"], descending=[True, False])
    removed = int(popular["item_id"][0])
    items = cat.items.filter(pl.col("item_id") != removed)
    media = {rel: tiny_catalog / rel for col in ("image_path", "audio_path") for rel in items[col].drop_nulls().unique()}
    write_catalog(root / "catalog", items, cat.interactions.filter(pl.col("item_id") != removed), media)
    run = Path(shutil.copytree(tiny_run, root / "run"))
    result = reindex(run, root / "catalog", device="cpu", progress=False)
    assert result.retired == 1
    return run, removed


@pytest.fixture(scope="module")
def client(retired_run):
    run, _ = retired_run
    live = LiveRecommender(run, device="cpu", poll_s=0)
    # raise_server_exceptions=False: a bug comes back as the 500 a real client would get, not as a raise.
    with TestClient(create_app(live, CatalogMedia.for_run(run), watch=False), raise_server_exceptions=False) as c:
        c.live = live
        yield c


def check_answer(res, retired: int) -> None:
    """Never a 500; an answer never holds the retired item; a refusal is the API's one-line JSON error."""
    assert res.status_code < 500, res.text
    assert res.headers["content-type"] == "application/json"
    body = res.json()
    if res.status_code == 200:
        assert retired not in [r["item_id"] for r in body["items"]]
    else:
        assert set(body) >= {"error", "status"} and body["status"] == res.status_code
        assert str(retired) in body["error"] and "\n" not in body["error"]


@pytest.mark.parametrize("explain", [False, True])
@pytest.mark.parametrize("rerank", [False, True])
def test_history_of_only_a_retired_item(client, retired_run, rerank: bool, explain: bool) -> None:
    _, retired = retired_run
    res = client.post("/recommend", json={"history": [retired], "k": 5, "rerank": rerank, "explain": explain})
    check_answer(res, retired)
    assert res.status_code == 200, res.text  # its vector is kept, so a history of it alone can be answered
    assert len(res.json()["items"]) == 5


@pytest.mark.parametrize("explain", [False, True])
@pytest.mark.parametrize("rerank", [False, True])
def test_known_user_who_saw_a_retired_item(client, retired_run, rerank: bool, explain: bool) -> None:
    _, retired = retired_run
    rec = client.live.current.rec
    user = next(u for u in sorted(rec.histories) if retired in rec.histories[u])
    res = client.post("/recommend", json={"user_id": user, "k": 5, "rerank": rerank, "explain": explain})
    check_answer(res, retired)
    assert res.status_code == 200 and len(res.json()["items"]) == 5


def test_similar_to_a_retired_item(client, retired_run) -> None:
    """Reindex keeps the retired item's vector, so items like it are found (and it is never one of them)."""
    _, retired = retired_run
    for res in (client.get("/similar", params={"item_id": retired, "k": 5}),
                client.post("/similar", json={"item_id": retired, "k": 5}),
                client.post("/similar", json={"item_id": str(retired), "k": 5, "where": "year > 1900"})):
        check_answer(res, retired)
        assert res.status_code == 200 and len(res.json()["items"]) == 5


def test_retired_item_in_filters(client, retired_run) -> None:
    """allow / deny / exclude naming a retired item: never a 500, never the item back."""
    _, retired = retired_run
    rec = client.live.current.rec
    others = [i for i in rec.item_ids if i != retired][:3]
    for extra in ({"allow": [retired]}, {"allow": [retired, *others]}, {"deny": [retired]},
                  {"exclude": [retired]}):
        check_answer(client.post("/recommend", json={"history": others[:1], "k": 3, "rerank": False, **extra}),
                     retired)
