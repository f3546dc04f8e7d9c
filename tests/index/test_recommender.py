"""The query API and end-to-end evaluation on a tiny trained run (synthetic catalog, Flat index)."""

from __future__ import annotations

import json
import logging
import re
import shutil
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from data.catalog import load_catalog, write_catalog
from data.protocol import leave_one_out
from data.rundir import RunDir
from index.build import build_index
from index.evaluate import evaluate
from index.recommender import QueryError
from index.store import IndexStateError, live_version
from rerank.pipeline import Pipeline


@pytest.fixture(scope="module")
def rec(tiny_run: Path) -> Pipeline:
    return Pipeline.load(tiny_run, device="cpu")


@pytest.fixture(scope="module")
def catalog_titles(tiny_catalog: Path) -> dict:
    items = load_catalog(tiny_catalog).items
    return dict(zip(items["item_id"].to_list(), items["title"].to_list()))


@pytest.fixture(scope="module")
def item_vectors(rec: Pipeline) -> np.ndarray:
    """Every indexed vector, in the recommender's row order (read back from the index by FAISS id)."""
    return np.stack([rec.index.reconstruct(int(f)) for f in rec.faiss_ids])


@pytest.fixture(scope="module")
def users(rec: Pipeline) -> list:
    """Three known users with short, medium and long histories."""
    by_len = sorted(rec.histories, key=lambda u: (len(rec.histories[u]), u))
    return [by_len[0], by_len[len(by_len) // 2], by_len[-1]]


def _exact_top(rec: Pipeline, item_vectors: np.ndarray, history: list, k: int,
               allowed: set | None = None) -> tuple[list, np.ndarray]:
    """Brute-force top-k item ids and scores, history excluded, optionally restricted to ``allowed``."""
    scores = item_vectors @ rec.embed_histories([history])[0]
    seen = {rec.index_items.row(i) for i in history}
    rows = [r for r in np.argsort(-scores, kind="stable") if r not in seen
            and (allowed is None or rec.item_ids[r] in allowed)][:k]
    return [rec.item_ids[r] for r in rows], scores[rows]


def test_load(rec: Pipeline, tiny_run: Path, tiny_catalog: Path) -> None:
    assert rec.version == live_version(tiny_run / "index")
    assert rec.index.ntotal == load_catalog(tiny_catalog).items.height == 150
    assert rec.config.dim == 32 and rec.index.d == 32
    assert len(rec.histories) == 60


def test_recommend_known_user(rec, users, item_vectors, catalog_titles) -> None:
    for user in users:
        history = rec.history_of(user)
        recs = rec.recommend(user_id=user, k=10, rerank=False)
        ids = [r.item_id for r in recs]
        assert len(recs) == 10 and len(set(ids)) == 10
        assert not set(ids) & set(history)
        assert all(r.title == catalog_titles[r.item_id] for r in recs)
        scores = [r.score for r in recs]
        assert scores == sorted(scores, reverse=True)
        assert all(r.rerank_score is None and r.score == r.retrieval_score for r in recs)
        want_ids, want_scores = _exact_top(rec, item_vectors, history, 10)
        assert ids == want_ids
        np.testing.assert_allclose(scores, want_scores, atol=1e-5)
        assert all(-1.0001 <= s <= 1.0001 for s in scores)  # cosine similarities


def test_search_vectors_excludes_nothing_unasked(rec, users, item_vectors) -> None:
    user = users[2]
    recs = rec.results(rec.search_vectors(rec.embed_histories([rec.history_of(user)]), k=20))[0]
    scores = item_vectors @ rec.embed_histories([rec.history_of(user)])[0]
    want = [rec.item_ids[r] for r in np.argsort(-scores, kind="stable")[:20]]
    assert [r.item_id for r in recs] == want
    assert set(want) & set(rec.history_of(user))  # a long history always overlaps the global top 20


def test_recommend_new_user_history(rec, users, item_vectors) -> None:
    history = rec.history_of(users[1])[:5]
    recs = rec.recommend(history=history, k=7, rerank=False)
    assert [r.item_id for r in recs] == _exact_top(rec, item_vectors, history, 7)[0]
    assert not {r.item_id for r in recs} & set(history)
    # Ids given as strings (as the CLI passes them) resolve to the same integer items.
    as_text = rec.recommend(history=[str(i) for i in history], k=7, rerank=False)
    assert [r.item_id for r in as_text] == [r.item_id for r in recs]
    # A known user's full history gives exactly the known user's recommendations.
    full = rec.recommend(history=rec.history_of(users[1]), k=7, rerank=False)
    assert full == rec.recommend(user_id=users[1], k=7, rerank=False)


def test_recommend_batch_equals_single_calls(rec) -> None:
    some = sorted(rec.histories)[:11]  # more than user.batch_size (8): two padded LLM batches
    batch = rec.recommend_batch(user_ids=some, k=5, rerank=False)
    assert len(batch) == len(some)
    for user, got in zip(some, batch):
        single = rec.recommend(user_id=user, k=5, rerank=False)
        assert [r.item_id for r in got] == [r.item_id for r in single]
        np.testing.assert_allclose([r.score for r in got], [r.score for r in single], atol=1e-5)


def test_allowed_restricts_results(rec, users, item_vectors) -> None:
    user = users[1]
    history = rec.history_of(user)
    allowed = [i for i in rec.item_ids if i not in history][::3][:25]
    recs = rec.recommend(user_id=user, k=10, rerank=False, allow=allowed)
    assert len(recs) == 10 and {r.item_id for r in recs} <= set(allowed)
    assert [r.item_id for r in recs] == _exact_top(rec, item_vectors, history, 10, set(allowed))[0]
    # Fewer allowed items than k: all of them, nothing else.
    few = rec.recommend(user_id=user, k=10, rerank=False, allow=allowed[:3])
    assert sorted(r.item_id for r in few) == sorted(allowed[:3])


def test_query_errors(rec, users) -> None:
    with pytest.raises(QueryError, match="unknown user_id 'nobody'"):
        rec.recommend(user_id="nobody")
    with pytest.raises(QueryError, match="unknown item_id 999999"):
        rec.recommend(history=[1, 999999])
    with pytest.raises(QueryError, match="unknown item_id 'abc'"):
        rec.recommend(history=["abc"])
    with pytest.raises(QueryError, match="empty history"):
        rec.recommend(history=[])
    with pytest.raises(QueryError, match="k must be at least 1"):
        rec.recommend(user_id=users[0], k=0)
    with pytest.raises(QueryError, match="either user_id or history, not both"):
        rec.recommend(user_id=users[0], history=[1])
    with pytest.raises(QueryError, match="unknown item_id 424242"):
        rec.recommend(user_id=users[0], allow=[1, 424242])


@pytest.mark.parametrize("history, message", [
    ("12", "history must be a list of ids, got str '12'"),  # not items "1" and "2"
    ([50.7], "item_id in history 50.7 has type float"),  # not item 50
    ([True], "item_id in history True has type bool"),  # not item 1
    ([None], "item_id in history None has type NoneType"),
    (12, "history must be a list of ids, got int 12"),
])
def test_mistyped_history_is_refused(rec, history, message) -> None:
    with pytest.raises(QueryError, match=re.escape(message)):
        rec.recommend(history=history)


def test_batch_argument_errors(rec, users) -> None:
    with pytest.raises(QueryError, match="user_ids is empty"):
        rec.recommend_batch(user_ids=[])
    with pytest.raises(QueryError, match="histories is empty"):
        rec.recommend_batch(histories=[])
    with pytest.raises(QueryError, match="k must be an integer, got str '10'"):
        rec.recommend_batch(user_ids=[users[0]], k="10")
    with pytest.raises(QueryError, match="k must be an integer, got bool"):
        rec.recommend(user_id=users[0], k=True)
    with pytest.raises(QueryError, match="user_id True has type bool"):
        rec.recommend(user_id=True)
    with pytest.raises(QueryError, match="give a user_id"):
        rec.recommend()
    with pytest.raises(QueryError, match=re.escape("exclude needs one list of item ids per query (1)")):
        rec.search_vectors(np.zeros((1, rec.index.d), dtype=np.float32), exclude=[[], []])


def test_string_form_of_integer_ids_is_accepted(rec, users) -> None:
    """"42" finds integer item 42 (ids typed on a command line), but "042" or "4.0" are not coerced."""
    history = rec.history_of(users[0])[:3]
    as_text = rec.recommend(history=[str(i) for i in history], k=5, rerank=False)
    assert [r.item_id for r in as_text] == [r.item_id for r in rec.recommend(history=history, k=5, rerank=False)]
    with pytest.raises(QueryError, match="unknown item_id '0"):
        rec.recommend(history=["0" + str(history[0])])


def test_exclude_removes_items(rec, users) -> None:
    top = rec.recommend(user_id=users[0], k=5, rerank=False)
    out = rec.recommend(user_id=users[0], k=5, rerank=False, exclude=[top[0].item_id])
    assert top[0].item_id not in [r.item_id for r in out]
    assert [r.item_id for r in out][:4] == [r.item_id for r in top][1:5]


def test_rerank_keeps_the_retrieved_candidates(rec, users) -> None:
    n = rec.config.rerank.candidates  # 10 in the tiny setup
    for user in users[:2]:
        retrieved = rec.recommend(user_id=user, k=n, rerank=False)
        reranked = rec.recommend(user_id=user, k=n, rerank=True)
        assert len(reranked) == n
        assert {r.item_id for r in reranked} == {r.item_id for r in retrieved}
        by_id = {r.item_id: r.score for r in retrieved}
        for r in reranked:
            assert r.rerank_score is not None
            assert r.retrieval_score == pytest.approx(by_id[r.item_id], abs=1e-5)
        scores = [r.score for r in reranked]
        assert scores == sorted(scores, reverse=True)
        # The LLM scores are the reranker's log-odds after this user's profile, and the final score their mix.
        prompt = rec.builder.build([rec.index_items.row(i) for i in rec.history_of(user)]).input_ids
        llm = rec.reranker.log_odds(prompt, [r.title for r in retrieved])
        np.testing.assert_allclose([r.rerank_score for r in reranked],
                                   [float(llm[[x.item_id for x in retrieved].index(r.item_id)]) for r in reranked],
                                   atol=1e-4)
        final = rec.reranker.combine(torch.tensor([r.score for r in retrieved]), llm)
        want = [retrieved[int(o)].item_id for o in torch.argsort(final, descending=True, stable=True)]
        assert [r.item_id for r in reranked] == want
        # A shorter list is the head of the reranked candidates.
        top3 = rec.recommend(user_id=user, k=3, rerank=True)
        assert [r.item_id for r in top3] == want[:3]


def test_rerank_default_follows_config(rec, users) -> None:
    assert rec.config.rerank.enabled
    recs = rec.recommend(user_id=users[0], k=4)
    assert all(r.rerank_score is not None for r in recs)


def _copy_run(tiny_run: Path, dst: Path) -> Path:
    shutil.copytree(tiny_run, dst)
    return dst


def _perturb(run: Path, prefix: str) -> str:
    """Add 0.5 to the first checkpoint tensor under ``prefix``; returns its name."""
    path = run / RunDir.WEIGHTS
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
        state = {k: f.get_tensor(k) for k in f.keys()}
    name = sorted(k for k in state if k.startswith(prefix))[0]
    state[name] = state[name] + 0.5
    save_file(state, str(path), metadata=meta)
    return name


def test_changed_item_tower_refuses_index(tiny_run: Path, tmp_path: Path) -> None:
    run = _copy_run(tiny_run, tmp_path / "run")
    _perturb(run, "item.fusion.")
    with pytest.raises(IndexStateError, match="fingerprint .*rebuild it with `towerrec build-index`"):
        Pipeline.load(run, device="cpu")
    # Rebuilding the index for the changed towers makes the run servable again.
    folder = build_index(run, device="cpu", progress=False)
    rec = Pipeline.load(run, device="cpu")
    assert rec.version == folder and len(rec.recommend(user_id=sorted(rec.histories)[0], k=3, rerank=False)) == 3


def test_changed_user_tower_keeps_index(tiny_run: Path, tmp_path: Path, rec: Pipeline) -> None:
    run = _copy_run(tiny_run, tmp_path / "run")
    _perturb(run, "user.head.")
    changed = Pipeline.load(run, device="cpu")  # the item tower, hence the index, is unchanged
    assert changed.version.name == rec.version.name
    history = rec.history_of(sorted(rec.histories)[0])
    assert not np.allclose(changed.embed_histories([history]), rec.embed_histories([history]))


def _catalog_warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records
            if r.name == "index.recommender" and r.levelno == logging.WARNING and "catalog" in r.getMessage()]


def test_load_warns_when_the_training_catalog_changed(tiny_run: Path, tiny_catalog: Path, tmp_path: Path,
                                                      caplog: pytest.LogCaptureFixture) -> None:
    catalog = tmp_path / "catalog"
    shutil.copytree(tiny_catalog, catalog)
    run = _copy_run(tiny_run, tmp_path / "run")
    RunDir(run).write_catalog_ref(load_catalog(catalog))
    with caplog.at_level(logging.WARNING):
        Pipeline.load(run, device="cpu")
    assert _catalog_warnings(caplog) == []
    # Re-prepared in place with other data (one interaction fewer).
    src = load_catalog(tiny_catalog)
    media = {rel: tiny_catalog / rel for col in ("image_path", "audio_path") for rel in src.items[col].drop_nulls()}
    write_catalog(catalog, src.items, src.interactions.slice(1), media, meta=src.meta, overwrite=True)
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        rec = Pipeline.load(run, device="cpu")
    warnings = _catalog_warnings(caplog)
    assert len(warnings) == 1
    assert f"the catalog {catalog.resolve()} changed since run {run} was trained" in warnings[0]
    # It still serves, from the run's own histories.
    user = sorted(rec.histories)[0]
    assert len(rec.recommend(user_id=user, k=3, rerank=False)) == 3
    assert rec.history_of(user) == RunDir(tiny_run).read_histories()[user]


def test_index_of_another_dimension_refuses(tiny_run: Path, tmp_path: Path) -> None:
    run = _copy_run(tiny_run, tmp_path / "run")
    manifest = live_version(run / "index") / "manifest.json"
    data = json.loads(manifest.read_text())
    manifest.write_text(json.dumps(dict(data, dim=64)))
    with pytest.raises(IndexStateError, match="index dimension 64 does not match the towers' dimension 32"):
        Pipeline.load(run, device="cpu")


def test_evaluate_sample(tiny_run: Path, rec: Pipeline) -> None:
    out = evaluate(tiny_run, users=10, progress=False, recommender=rec)
    assert out["users"] == 10
    assert out["items"] == pl.read_parquet(tiny_run / "id_table.parquet").height
    for mode in ("retrieval", "reranked"):
        metrics = out[mode]
        for k in (5, 10, 20):
            for name in ("recall", "ndcg", "mrr"):
                assert 0.0 <= metrics[f"{name}@{k}"] <= 1.0
            assert metrics[f"mrr@{k}"] <= metrics[f"ndcg@{k}"] <= metrics[f"recall@{k}"]
            # A hit rate over 10 users is a multiple of 0.1.
            assert metrics[f"recall@{k}"] * 10 == pytest.approx(round(metrics[f"recall@{k}"] * 10), abs=1e-6)
        assert metrics["recall@5"] <= metrics["recall@10"] <= metrics["recall@20"]
    # Same seed, same sample: the evaluation is deterministic.
    again = evaluate(tiny_run, users=10, rerank=False, progress=False, recommender=rec)["retrieval"]
    assert {k: v for k, v in again.items() if k != "seconds"} == {
        k: v for k, v in out["retrieval"].items() if k != "seconds"}


def test_evaluate_all_users_matches_queries_and_training(tiny_run: Path, tiny_catalog: Path,
                                                         rec: Pipeline) -> None:
    out = evaluate(tiny_run, rerank=False, progress=False, recommender=rec)
    assert "reranked" not in out and out["users"] == 60
    # Recompute the served metrics by hand from public queries.
    split = leave_one_out(load_catalog(tiny_catalog).interactions, rec.config.data.min_count)
    hits, rr = 0, 0.0
    for u in range(split.num_users):
        history = [split.item_ids[j] for j in split.sequences[u][:-1]]
        target = split.item_ids[split.test_target(u)]
        ids = [r.item_id for r in rec.recommend(history=history, k=20, rerank=False, allow=split.item_ids)]
        if target in ids:
            hits += 1
            rr += 1.0 / (ids.index(target) + 1)
    assert out["retrieval"]["recall@20"] == pytest.approx(round(hits / 60, 4), abs=1e-9)
    assert out["retrieval"]["mrr@20"] == pytest.approx(round(rr / 60, 4), abs=1e-9)
    # The served path (index + Recommender) reproduces the training loop's own test metrics.
    test = json.loads((tiny_run / "metrics.json").read_text())["test"]
    for key in ("recall@10", "recall@20", "ndcg@10", "mrr@20"):
        assert out["retrieval"][key] == pytest.approx(test[key], abs=1e-4), key


def test_string_ids_end_to_end(tiny_catalog: Path, tmp_path: Path) -> None:
    """String item and user ids ("m0001", "u7") go through hashed FAISS ids and come back unchanged."""
    from configs import load_config
    from data.catalog import write_catalog
    from train.loop import train

    source = load_catalog(tiny_catalog)
    as_item = ("m" + pl.col("item_id").cast(pl.Utf8).str.zfill(4)).alias("item_id")
    items = source.items.with_columns(as_item)
    interactions = source.interactions.with_columns(as_item, ("u" + pl.col("user_id").cast(pl.Utf8)).alias("user_id"))
    media = {rel: tiny_catalog / rel for col in ("image_path", "audio_path")
             for rel in items[col].drop_nulls().to_list()}
    write_catalog(tmp_path / "catalog", items, interactions, media)
    run = tmp_path / "run"
    train(load_config("tiny", ["train.epochs=1"]), tmp_path / "catalog", run, progress=False)
    build_index(run, device="cpu", progress=False)

    rec = Pipeline.load(run, device="cpu")
    indexed = pl.read_parquet(live_version(run / "index") / "items.parquet")
    assert indexed["item_id"].dtype == pl.Utf8 and indexed["faiss_id"].n_unique() == 150
    assert sorted(rec.histories)[:3] == ["u1", "u10", "u11"]  # string order, not numeric
    recs = rec.recommend(user_id="u10", k=5, rerank=True)
    assert len(recs) == 5 and all(isinstance(r.item_id, str) and r.item_id.startswith("m") for r in recs)
    assert not {r.item_id for r in recs} & set(rec.history_of("u10"))
    titles = dict(zip(items["item_id"].to_list(), items["title"].to_list()))
    assert all(r.title == titles[r.item_id] for r in recs)
    new = rec.recommend(history=["m0001", "m0050"], k=3, rerank=False)
    assert len(new) == 3 and not {r.item_id for r in new} & {"m0001", "m0050"}
    with pytest.raises(QueryError, match="unknown item_id 1"):
        rec.recommend(history=[1])
