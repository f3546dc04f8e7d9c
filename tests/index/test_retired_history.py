"""Retired items (kept in the index version for histories, not searchable) in a query: a history made only of
them still gets recommendations, ``similar`` recommends from their stored vector, and nothing fails.

The run is a copy of the tiny run reindexed against its catalog without its most rated item (how an item
becomes retired: it left the catalog the run was trained on)."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import faiss
import numpy as np
import polars as pl
import pytest

import cli
from data.catalog import load_catalog, write_catalog
from errors import QueryError
from index import ann
from index.reindex import reindex
from rerank.pipeline import Pipeline


@pytest.fixture(scope="module")
def retired_run(tiny_run: Path, tiny_catalog: Path, tmp_path_factory) -> tuple[Path, int]:
    """``(run, retired item id)``: the tiny run reindexed without its most rated item (nothing re-embedded)."""
    cat = load_catalog(tiny_catalog)
    counts = cat.interactions.group_by("item_id").len().sort(["len", "item_id"], descending=[True, False])
    gone = int(counts["item_id"][0])
    items = cat.items.filter(pl.col("item_id") != gone)
    events = cat.interactions.filter(pl.col("item_id") != gone)
    media = {rel: tiny_catalog / rel for col in ("image_path", "audio_path") for rel in items[col].drop_nulls()}
    base = tmp_path_factory.mktemp("retired")
    write_catalog(base / "catalog", items, events, media)
    run = base / "run"
    shutil.copytree(tiny_run, run)
    result = reindex(run, base / "catalog", device="cpu", progress=False)
    assert (result.retired, result.embedded) == (1, 0)
    return run, gone


@pytest.fixture(scope="module")
def rec(retired_run) -> Pipeline:
    return Pipeline.load(retired_run[0], device="cpu")


def test_fixture_item_is_retired(rec: Pipeline, retired_run) -> None:
    """The item is a row of the version (a history may name it) with a stored vector, but not in the FAISS index."""
    gone = retired_run[1]
    row = rec.index_items.row(gone)
    assert rec._internal_of[row] == -1 and rec._stored is not None
    assert rec.index.ntotal == len(rec.item_ids) - 1


def test_exclusion_lists_of_unsearchable_items_only() -> None:
    """ann: exclusion lists holding only -1 (items with no internal id) exclude nothing, on both searchers."""
    rng = np.random.default_rng(0)
    xb = rng.standard_normal((50, 8)).astype(np.float32)
    flat = faiss.IndexFlatIP(8)
    flat.add(xb)
    searcher = ann.FaissSearcher(flat)
    _, plain = searcher.search(xb[:3], 5)
    for exclude in ([np.array([-1])] * 3, [np.array([-1, -1]), np.array([], dtype=np.int64), np.array([-1])]):
        np.testing.assert_array_equal(searcher.search(xb[:3], 5, exclude=exclude)[1], plain)
    keep = np.ones(50, dtype=bool)
    keep[::7] = False  # a post-filter as well
    _, kept = searcher.search(xb[:3], 5, keep=keep, exclude=[np.array([-1])] * 3)
    assert (kept >= 0).all() and keep[kept].all()
    _, exact = ann.TorchSearcher(xb, "cpu").search(xb[:3], 5, exclude=[np.array([-1])] * 3)
    np.testing.assert_array_equal(exact, plain)


@pytest.mark.parametrize("rerank", [False, True])
def test_history_of_only_retired_items_gets_recommendations(rec: Pipeline, retired_run, rerank: bool) -> None:
    gone = retired_run[1]
    out = rec.recommend(history=[gone], k=5, rerank=rerank)
    assert len(out) == 5 and gone not in {r.item_id for r in out}
    if rerank:
        assert all(r.rerank_score is not None for r in out)
    # The same ranking as a search from the history's embedding, with nothing excluded (the item is not there).
    if not rerank:
        hits = rec.search_vectors(rec.embed_histories([[gone]]), k=5)
        assert [r.item_id for r in out] == [r.item_id for r in rec.results(hits)[0]]
    batch = rec.recommend_batch(histories=[[gone], [gone, gone]], k=3, rerank=rerank)
    assert [len(b) for b in batch] == [3, 3]


def test_history_of_only_retired_items_with_explain(rec: Pipeline, retired_run, caplog) -> None:
    """Reasons rank the history by evidence from the retired item's stored vector (no fallback warning)."""
    gone = retired_run[1]
    with caplog.at_level(logging.WARNING, logger="index.recommender"):
        out = rec.recommend(history=[gone], k=3, rerank=True, explain=True)
    assert len(out) == 3
    assert all(r.reason and r.reason_source in ("llm", "template") and set(r.reason_cites) <= {gone} for r in out)
    assert not [r for r in caplog.records if r.name == "index.recommender"], caplog.text
    sims = rec.similarities([rec.index_items.row(gone)], rec.index_items.row(out[0].item_id))
    assert sims is not None and -1.0 <= float(sims[0]) <= 1.0


def test_known_user_with_a_retired_item_in_the_history(rec: Pipeline, retired_run) -> None:
    gone = retired_run[1]
    users = [u for u, h in rec.histories.items() if gone in h]
    assert users
    for recs in rec.recommend_batch(user_ids=users[:4], k=5, rerank=False):
        assert len(recs) == 5 and gone not in {r.item_id for r in recs}


def test_similar_to_a_retired_item_uses_its_stored_vector(rec: Pipeline, retired_run) -> None:
    """similar(retired): the nearest searchable items to the vector the version keeps for it."""
    gone = retired_run[1]
    out = rec.similar(gone, k=5)
    want = rec.results(rec.search_vectors(np.asarray(rec._stored[rec.index_items.row(gone)])[None], k=5))[0]
    assert len(out) == 5 and [r.item_id for r in out] == [r.item_id for r in want]
    filtered = rec.similar(str(gone), k=3, where="item_id > 100", deny=[out[0].item_id])
    assert len(filtered) == 3 and all(r.item_id > 100 and r.item_id != out[0].item_id for r in filtered)


def test_similar_to_a_retired_item_without_a_stored_vector_says_so(rec: Pipeline, retired_run,
                                                                   monkeypatch) -> None:
    """Where the version keeps no vectors beside the index, a retired item has none to search from."""
    gone = retired_run[1]
    monkeypatch.setattr(rec.retriever, "_stored", None)
    with pytest.raises(QueryError, match=rf"^item {gone} is retired: it left the catalog.* has no vector"):
        rec.similar(gone, k=3)


def test_unknown_item_message_names_the_catalog_not_a_field(rec: Pipeline) -> None:
    with pytest.raises(QueryError) as err:
        rec.similar(99999)
    assert str(err.value) == f"unknown item_id 99999: not in the catalog of index {rec.version.name}"
    with pytest.raises(QueryError, match=r"^item_id 7\.5 has type float"):
        rec.similar(7.5)


def test_cli_query_history_of_a_retired_item(retired_run, capsys, caplog) -> None:
    run, gone = retired_run
    base = ["query", "--run", str(run), "--history", str(gone), "-k", "3", "--device", "cpu"]
    with caplog.at_level(logging.ERROR):
        assert cli.main([*base, "--rerank", "off"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "history (1 items, most recent last):" and lines[1].startswith(f"  {gone}: ")
    assert lines[2] == "top-3:" and len(lines) == 7
    assert cli.main([*base, "--rerank", "on", "--explain", "--json"]) == 0
    items = json.loads(capsys.readouterr().out)["items"]
    assert len(items) == 3 and all(i["reason"] and i["item_id"] != gone for i in items)
