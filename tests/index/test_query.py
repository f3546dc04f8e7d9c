"""The query API's filters, limits, result type, similar items, search paths and auto-tuned parameters, on the
tiny trained run (150 synthetic films, Flat index), each checked against brute force over the vectors."""

from __future__ import annotations

import logging
import re
import shutil
from pathlib import Path

import numpy as np
import polars as pl
import pytest

from data.rundir import RunDir
from index import ann
from index.build import build_index
from index.recommender import MAX_K, Hits, QueryError, Recommendation, Recommender, Results
from index.store import live_version
from index.tuning import read_tuning


@pytest.fixture(scope="module")
def rec(tiny_run: Path) -> Recommender:
    return Recommender.load(tiny_run, device="cpu")


@pytest.fixture(scope="module")
def item_vectors(rec: Recommender) -> np.ndarray:
    """Every indexed vector, in items-table row order."""
    return np.stack([rec.index.reconstruct(int(f)) for f in rec.faiss_ids])


@pytest.fixture(scope="module")
def user(rec: Recommender):
    return sorted(rec.histories, key=lambda u: (len(rec.histories[u]), u))[len(rec.histories) // 2]


def _exact(rec: Recommender, vectors: np.ndarray, query: np.ndarray, k: int, passes=lambda row: True,
           skip=()) -> list:
    """Brute-force top-k item ids of one query vector over the rows that pass, ``skip`` (item ids) left out."""
    scores = vectors @ query
    skip = set(skip)
    rows = [r for r in np.argsort(-scores, kind="stable") if passes(r) and rec.item_ids[r] not in skip]
    return [rec.item_ids[r] for r in rows[:k]]


def _user_vector(rec: Recommender, user) -> np.ndarray:
    return rec.embed_histories([rec.history_of(user)])[0]


def test_results_are_lists_with_version_and_latency(rec, user) -> None:
    out = rec.recommend(user_id=user, k=5, rerank=False)
    assert isinstance(out, Results) and isinstance(out, list) and len(out) == 5
    assert all(isinstance(r, Recommendation) for r in out) and out.items == list(out)
    assert out.version == rec.version.name and 0 < out.latency_ms < 60_000
    assert "version=" in repr(out) and "latency_ms=" in repr(out)
    batch = rec.recommend_batch(user_ids=[user, user], k=3, rerank=False)
    assert all(isinstance(b, Results) and b.version == rec.version.name and b.latency_ms > 0 for b in batch)
    assert [r.item_id for r in batch[0]] == [r.item_id for r in out[:3]]


def test_where_sql_returns_k_matching_items(rec, user, item_vectors) -> None:
    """The titles end in their year: "title LIKE '%(1995)'" keeps the 1995 films."""
    out = rec.recommend(user_id=user, k=8, rerank=False, where="title LIKE '%(1995)'")
    assert len(out) == 8 and all(r.title.endswith("(1995)") for r in out)
    want = _exact(rec, item_vectors, _user_vector(rec, user), 8, lambda r: rec.titles[r].endswith("(1995)"),
                  rec.history_of(user))
    assert [r.item_id for r in out] == want
    # The same condition as a polars expression.
    expr = rec.recommend(user_id=user, k=8, rerank=False, where=pl.col("title").str.ends_with("(1995)"))
    assert [r.item_id for r in expr] == want
    numeric = rec.recommend(user_id=user, k=10, rerank=False, where="item_id > 200 AND item_id <= 300")
    assert len(numeric) == 10 and all(200 < r.item_id <= 300 for r in numeric)


def test_where_errors_are_one_clear_line(rec, user) -> None:
    cases = [
        ("decade > 1990", "where: unknown column 'decade'; the item columns are faiss_id, item_id, title"),
        (pl.col("genre") == "Drama", "where: unknown column 'genre'"),
        ("year >", "where is not a valid condition: "),
        ("item_id + 1", "where must give true or false for each item, got values of type Int64"),
        ("  ", "where is empty"),
        (42, "where must be a polars expression or SQL text, got int"),
    ]
    for where, message in cases:
        with pytest.raises(QueryError, match="^" + re.escape(message)):
            rec.recommend(user_id=user, k=3, rerank=False, where=where)
    for attack, construct in (("__import__('os').system('true') = 0", "dot access (a.b)"),
                              ("__import__('os') = 0", "the function __import__()")):  # SQL, never Python
        with pytest.raises(QueryError, match="^where may not use " + re.escape(construct)) as err:
            rec.recommend(user_id=user, where=attack)
        assert len(str(err.value)) < 400


def test_deny_and_allow(rec, user, item_vectors) -> None:
    top = [r.item_id for r in rec.recommend(user_id=user, k=10, rerank=False)]
    denied = rec.recommend(user_id=user, k=10, rerank=False, deny=top[:4])
    assert len(denied) == 10 and not {r.item_id for r in denied} & set(top[:4])
    assert [r.item_id for r in denied][:6] == top[4:]
    allow = [i for i in rec.item_ids if i not in rec.history_of(user)][::5]
    both = rec.recommend(user_id=user, k=10, rerank=False, allow=allow, deny=allow[:3],
                         where="title NOT LIKE '%(1996)'")
    passes = set(allow[3:]) & {i for i, t in zip(rec.item_ids, rec.titles) if not t.endswith("(1996)")}
    assert len(both) == 10 and {r.item_id for r in both} <= passes
    want = _exact(rec, item_vectors, _user_vector(rec, user), 10, lambda r: rec.item_ids[r] in passes,
                  rec.history_of(user))
    assert [r.item_id for r in both] == want
    with pytest.raises(QueryError, match="unknown item_id 777777 in deny"):
        rec.recommend(user_id=user, deny=[777777])
    assert rec.recommend(user_id=user, k=5, rerank=False, allow=[]) == []


def test_over_fetch_when_most_candidates_are_filtered(rec, user, item_vectors) -> None:
    """Deny the 130 items nearest to the user: the first candidates all fail, and k still come back."""
    order = _exact(rec, item_vectors, _user_vector(rec, user), 150)
    out = rec.recommend(user_id=user, k=10, rerank=False, deny=order[:130])
    want = [i for i in order[130:] if i not in set(rec.history_of(user))][:10]
    assert len(want) == 10 and [r.item_id for r in out] == want
    batch = rec.recommend_batch(user_ids=sorted(rec.histories)[:5], k=10, rerank=False, deny=order[:130])
    assert all(len(b) == 10 and not {r.item_id for r in b} & set(order[:130]) for b in batch)


def test_k_limits(rec, user) -> None:
    everything = rec.recommend(user_id=user, k=MAX_K, rerank=False)  # 1000 > 150 items: all that may be shown
    assert len(everything) == 150 - len(set(rec.history_of(user)))
    assert len({r.item_id for r in everything}) == len(everything)
    assert [r.score for r in everything] == sorted((r.score for r in everything), reverse=True)
    for call in (lambda: rec.recommend(user_id=user, k=1001), lambda: rec.recommend_batch(user_ids=[user], k=1001),
                 lambda: rec.similar(rec.item_ids[0], k=1001)):
        with pytest.raises(QueryError, match="^k must be at most 1000, got 1001$"):
            call()


def test_similar_items(rec, item_vectors) -> None:
    item = rec.item_ids[7]
    out = rec.similar(item, k=6)
    assert isinstance(out, Results) and out.version == rec.version.name and len(out) == 6
    assert item not in [r.item_id for r in out]
    assert [r.item_id for r in out] == _exact(rec, item_vectors, item_vectors[7], 6, skip=[item])
    assert out[0].score == pytest.approx(float(item_vectors[rec.index_items.row(out[0].item_id)] @ item_vectors[7]),
                                         abs=1e-5)
    filtered = rec.similar(str(item), k=4, where="title LIKE '%(1996)'", deny=[out[0].item_id])
    assert len(filtered) == 4 and all(r.title.endswith("(1996)") and r.item_id != out[0].item_id for r in filtered)
    with pytest.raises(QueryError, match="unknown item_id 'nope'"):
        rec.similar("nope")


def test_search_vectors_is_raw_faiss_plus_filters(rec, item_vectors) -> None:
    users = rec.embed_histories([rec.history_of(u) for u in sorted(rec.histories)[:6]])
    hits = rec.search_vectors(users, k=12)
    assert isinstance(hits, Hits) and hits.rows.shape == hits.scores.shape == (6, 12)
    raw_scores, raw_ids = rec.index.search(users, 12)
    np.testing.assert_array_equal(rec.faiss_ids[hits.rows], raw_ids)
    np.testing.assert_allclose(hits.scores, raw_scores, atol=1e-6)
    lists = rec.results(hits)
    assert [r.item_id for r in lists[2]] == [rec.item_ids[r] for r in hits.rows[2]]
    with pytest.raises(QueryError, match=re.escape("vectors must have shape (B, 32), got (6, 31)")):
        rec.search_vectors(users[:, :31])
    with pytest.raises(QueryError, match="nprobe does not apply to this index"):
        rec.search_vectors(users, nprobe=4)
    with pytest.raises(QueryError, match="ef_search does not apply to this index"):
        rec.set_search_params(ef_search=32)


def test_torch_exact_path_through_the_recommender(rec, user, item_vectors) -> None:
    """The path a machine with only torch's GPU takes, on CPU tensors: same answers as faiss."""
    filters = [{}, {"where": "title LIKE '%(1996)'"}, {"deny": rec.item_ids[:100]}]
    want = [[r.item_id for r in rec.recommend(user_id=user, k=10, rerank=False, **f)] for f in filters]
    faiss_searcher = rec.searcher
    try:
        rec.searcher = ann.TorchSearcher(item_vectors[rec._row_of], "cpu")
        got = [[r.item_id for r in rec.recommend(user_id=user, k=10, rerank=False, **f)] for f in filters]
    finally:
        rec.searcher = faiss_searcher
    assert got == want


@pytest.mark.gpu
def test_recommender_searches_on_the_gpu(tiny_run: Path, rec: Recommender, user,
                                         caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO):
        gpu = Recommender.load(tiny_run, device="cuda")
    assert "search path:" in caplog.text
    if isinstance(gpu.searcher, ann.TorchSearcher):
        assert gpu.searcher.vectors.is_cuda and "torch exact search" in caplog.text
    else:
        assert gpu.searcher.gpu and "faiss GPU" in caplog.text
    for f in ({}, {"where": "title LIKE '%(1996)'"}):
        got = [r.item_id for r in gpu.recommend(user_id=user, k=10, rerank=False, **f)]
        want = [r.item_id for r in rec.recommend(user_id=user, k=10, rerank=False, **f)]
        assert len(set(got) & set(want)) >= 9  # the user tower on CUDA may round differently


def test_year_filter_on_a_metadata_column(tiny_run: Path, tmp_path: Path, user) -> None:
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    items_path = live_version(run / "index") / RunDir.INDEX_ITEMS
    items = pl.read_parquet(items_path)
    items.with_columns(pl.col("title").str.extract(r"\((\d{4})\)\s*$").cast(pl.Int64).alias("year")) \
        .write_parquet(items_path)
    rec = Recommender.load(run, device="cpu")
    years = dict(zip(rec.item_ids, rec.items["year"].to_list()))
    for where in ("year > 1990", pl.col("year") > 1990):
        out = rec.recommend(user_id=user, k=10, rerank=False, where=where)
        assert len(out) == 10 and all(years[r.item_id] > 1990 for r in out)
    old = rec.recommend(user_id=user, k=5, rerank=False, where="year < 1960 AND title NOT LIKE 'Star%'")
    assert len(old) == 5 and all(years[r.item_id] < 1960 for r in old)


def test_ivf_index_parameters_are_tuned_recorded_and_reused(tiny_run: Path, tmp_path: Path, user,
                                                            caplog: pytest.LogCaptureFixture) -> None:
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    folder = build_index(run, factory="IVF8,Flat", device="cpu", progress=False)
    with caplog.at_level(logging.INFO, logger="index"):
        rec = Recommender.load(run, device="cpu")
    assert "auto-tuned IndexIVFFlat: nprobe=" in caplog.text
    # The tuning queries are the known users' own embeddings (the real query distribution), not item vectors.
    assert f"{len(rec.histories)} known users' embeddings" in caplog.text
    record = read_tuning(folder)
    assert record["target_recall"] == rec.config.index.target_recall == 0.95 and record["reached"]
    assert rec.knobs == record["knobs"] and 1 <= rec.knobs["nprobe"] <= 8 and record["recall"] >= 0.95
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="index"):
        again = Recommender.load(run, device="cpu")
    assert "auto-tuned IndexIVFFlat" not in caplog.text and "auto-tuned for recall@10 0.95" in caplog.text
    assert again.knobs == rec.knobs
    # Query-time parameters: every list probed is exact search.
    flat = Recommender.load(tiny_run, device="cpu")
    exact = [r.item_id for r in flat.recommend(user_id=user, k=10, rerank=False)]
    again.set_search_params(nprobe=8)
    assert [r.item_id for r in again.recommend(user_id=user, k=10, rerank=False)] == exact
    # Filters still return k with a narrow IVF search (the search widens nprobe when it runs short).
    again.set_search_params(nprobe=1)
    out = again.recommend(user_id=user, k=10, rerank=False, where="title LIKE '%(1994)'")
    assert len(out) == 10 and all(r.title.endswith("(1994)") for r in out)
    with pytest.raises(QueryError, match="nprobe must be an integer >= 1, got 0"):
        again.set_search_params(nprobe=0)
    assert again.knobs["nprobe"] == 1


def test_where_reads_the_catalogs_own_columns(rec, user) -> None:
    """The issue's example: catalog columns such as ``year`` are kept in the index version for filters."""
    years = dict(zip(rec.items["item_id"].to_list(), rec.items["year"].to_list()))
    assert any(y is not None and y <= 1990 for y in years.values())  # the filter has something to remove
    out = rec.recommend(user_id=user, k=10, rerank=False, where="year > 1990")
    assert len(out) == 10 and all(years[r.item_id] > 1990 for r in out)
    assert "image_path" not in rec.items.columns  # media paths stay in the catalog
