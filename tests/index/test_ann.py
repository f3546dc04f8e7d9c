"""index.ann: filtered top-k with over-fetching, the torch exact path, GPU placement and auto-tuning, all
checked against brute-force numpy on seeded clustered data."""

from __future__ import annotations

import logging

import faiss
import numpy as np
import pytest
import torch

from errors import IndexStateError, QueryError
from index import ann
from index.store import build_faiss
from index.tuning import autotune, recall_at

N, D = 4000, 32


def _clustered(n: int, d: int, clusters: int, seed: int) -> np.ndarray:
    """Unit vectors around random centres, overlapping enough that ANN search is not trivially exact."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((clusters, d)).astype(np.float32)
    x = centres[rng.integers(0, clusters, n)] + rng.standard_normal((n, d)).astype(np.float32)
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


@pytest.fixture(scope="module")
def data() -> tuple[np.ndarray, np.ndarray]:
    x = _clustered(N + 300, D, 40, seed=0)
    return x[:N], x[N:]  # database, queries


@pytest.fixture(scope="module")
def indexes(data) -> dict[str, faiss.Index]:
    xb, _ = data
    ids = np.arange(N, dtype=np.int64) * 5 + 3  # stable ids unlike the internal ones
    return {f: build_faiss(xb, ids, f, nprobe=1, ef_search=16) for f in ("Flat", "IVF64,Flat", "HNSW16")}


def _exact(xb: np.ndarray, xq: np.ndarray, k: int, keep: np.ndarray | None = None,
           exclude: list | None = None) -> np.ndarray:
    """Brute-force top-k internal ids (-1 padded) of each query over the items passing ``keep``."""
    scores = xq @ xb.T
    if keep is not None:
        scores[:, ~keep] = -np.inf
    for q, ex in enumerate(exclude or []):
        scores[q, ex] = -np.inf
    order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return np.where(np.isfinite(np.take_along_axis(scores, order, 1)), order, -1)


def _searcher(index: faiss.Index) -> ann.FaissSearcher:
    return ann.FaissSearcher(ann.unwrap(index)[0])


def test_unwrap_maps_internal_to_stable_ids(indexes) -> None:
    inner, id_map = ann.unwrap(indexes["Flat"])
    assert isinstance(inner, faiss.IndexFlat) and inner.ntotal == N
    np.testing.assert_array_equal(id_map, np.arange(N) * 5 + 3)


@pytest.mark.parametrize("fraction", [0.5, 0.01])  # post-filter with over-fetch; bitmap selector in the search
def test_flat_filtered_search_is_exact(data, indexes, fraction: float) -> None:
    xb, xq = data
    keep = np.random.default_rng(1).random(N) < fraction
    exclude = [np.flatnonzero(keep)[q % 7: q % 7 + 3] for q in range(len(xq))]  # passing items excluded too
    scores, labels = _searcher(indexes["Flat"]).search(xq, 10, keep=keep, exclude=exclude)
    np.testing.assert_array_equal(labels, _exact(xb, xq, 10, keep, exclude))
    assert (labels >= 0).all() and keep[labels].all()
    np.testing.assert_allclose(scores, np.take_along_axis(xq @ xb.T, labels, 1), atol=1e-5)


@pytest.mark.parametrize("factory", ["Flat", "IVF64,Flat", "HNSW16"])
def test_over_fetch_returns_k_when_most_candidates_are_filtered(data, indexes, factory: str) -> None:
    """Only the 8% of items least like each query pass: the first candidates are all filtered out, so the
    search must ask again for more (and IVF with nprobe=1 must probe more lists) until k survive."""
    xb, xq = data
    q = xq[:20]
    mean_score = (q @ xb.T).mean(axis=0)
    keep = mean_score < np.quantile(mean_score, 0.08)  # 320 items, far from these queries
    scores, labels = _searcher(indexes[factory]).search(q, 25, keep=keep)
    assert (labels >= 0).all(), "fewer than k results although 320 items pass"
    assert keep[labels].all() and all(len(set(row)) == 25 for row in labels)
    assert (np.diff(scores, axis=1) <= 1e-6).all()  # best first
    recall = recall_at(labels, _exact(xb, q, 25, keep))
    # Exact for Flat; approximate indexes find true neighbours among the few far items less reliably.
    assert recall >= (1.0 if factory == "Flat" else 0.5), recall


def test_short_results_when_fewer_items_pass(data, indexes) -> None:
    xb, xq = data
    keep = np.zeros(N, dtype=bool)
    keep[[5, 17, 2000]] = True
    for factory in indexes:
        scores, labels = _searcher(indexes[factory]).search(xq[:4], 10, keep=keep)
        assert (np.sort(labels[:, :3], axis=1) == [5, 17, 2000]).all(), factory
        assert (labels[:, 3:] == -1).all() and np.isneginf(scores[:, 3:]).all()
    _, none = _searcher(indexes["Flat"]).search(xq[:2], 5, keep=np.zeros(N, dtype=bool))
    assert (none == -1).all()


def test_k_of_1000_and_whole_index(data, indexes) -> None:
    xb, xq = data
    _, labels = _searcher(indexes["Flat"]).search(xq[:3], 1000)
    np.testing.assert_array_equal(labels, _exact(xb, xq[:3], 1000))
    _, everything = _searcher(indexes["HNSW16"]).search(xq[:2], N + 10)
    assert (np.sort(everything[:, :N], axis=1) == np.arange(N)).all() and (everything[:, N:] == -1).all()


def test_torch_path_on_cpu_tensors_matches_faiss(data, indexes) -> None:
    """The GPU fallback's logic (matrix product + top-k, filters applied to the scores), run on the CPU."""
    xb, xq = data
    torch_search = ann.TorchSearcher(ann.index_vectors(ann.unwrap(indexes["Flat"])[0]), "cpu", max_scores=N * 64)
    assert "torch exact search" in torch_search.name and "cpu" in torch_search.name
    keep = np.random.default_rng(2).random(N) < 0.3
    exclude = [np.flatnonzero(keep)[:q % 4] for q in range(len(xq))]
    for kwargs in ({}, {"keep": keep}, {"keep": keep, "exclude": exclude}):
        t_scores, t_labels = torch_search.search(xq, 15, **kwargs)  # 300 queries in chunks of 64
        f_scores, f_labels = _searcher(indexes["Flat"]).search(xq, 15, **kwargs)
        np.testing.assert_array_equal(t_labels, f_labels)
        np.testing.assert_allclose(t_scores, f_scores, atol=1e-5)
    few = np.zeros(N, dtype=bool)
    few[:4] = True
    scores, labels = torch_search.search(xq[:2], 6, keep=few)
    assert (np.sort(labels[:, :4], axis=1) == np.arange(4)).all() and (labels[:, 4:] == -1).all()


@pytest.mark.gpu
def test_torch_path_on_gpu(data, indexes, caplog: pytest.LogCaptureFixture) -> None:
    """With CUDA, a GPU request runs on it (faiss's GPU index where faiss sees one, else torch) and agrees
    with CPU faiss; it never runs on the CPU."""
    xb, xq = data
    keep = np.random.default_rng(3).random(N) < 0.2
    with caplog.at_level(logging.INFO, logger="index.ann"):
        searcher = ann.make_searcher(indexes["Flat"], "gpu")
    path = [r.getMessage() for r in caplog.records if r.getMessage().startswith("search path:")]
    assert len(path) == 1 and ("faiss GPU" in path[0] or "on cuda" in path[0]), path
    if isinstance(searcher, ann.TorchSearcher):
        assert searcher.vectors.is_cuda
    else:
        assert searcher.gpu
    got = searcher.search(xq, 10, keep=keep)[1]
    want = _searcher(indexes["Flat"]).search(xq, 10, keep=keep)[1]
    assert recall_at(got, want) >= 0.999  # float rounding may swap exact ties
    direct = ann.TorchSearcher(xb, "cuda")
    assert direct.vectors.device.type == "cuda"
    np.testing.assert_array_equal(direct.search(xq, 10, keep=keep)[1], _exact(xb, xq, 10, keep))


def test_gpu_request_without_a_gpu_is_an_error(indexes, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(faiss, "get_num_gpus", lambda: 0)
    with pytest.raises(IndexStateError, match="GPU search requested, but neither faiss nor torch sees a GPU"):
        ann.make_searcher(indexes["Flat"], "gpu")
    with pytest.raises(IndexStateError, match="unknown search device 'tpu'"):
        ann.make_searcher(indexes["Flat"], "tpu")


def test_search_paths_are_logged(indexes, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="index.ann"):
        ann.make_searcher(indexes["HNSW16"], "cpu")
    assert "search path: faiss CPU, IndexHNSWFlat" in caplog.text


def test_knobs(indexes) -> None:
    assert ann.knobs_of(indexes["Flat"]) == {} and ann.is_exact(indexes["Flat"])
    assert ann.knobs_of(indexes["IVF64,Flat"]) == {"nprobe": 1} and not ann.is_exact(indexes["IVF64,Flat"])
    assert ann.knobs_of(indexes["HNSW16"]) == {"ef_search": 16}
    assert ann.check_knobs(indexes["IVF64,Flat"], {"nprobe": 500, "ef_search": None}) == {"nprobe": 64}
    with pytest.raises(QueryError, match="nprobe does not apply to this index .*none: it is exact"):
        ann.check_knobs(indexes["Flat"], {"nprobe": 4})
    with pytest.raises(QueryError, match="ef_search must be an integer >= 1, got 0"):
        ann.check_knobs(indexes["HNSW16"], {"ef_search": 0})


def test_query_time_knobs_reach_the_search(data, indexes) -> None:
    xb, xq = data
    truth = _exact(xb, xq, 10)
    searcher = _searcher(indexes["IVF64,Flat"])
    one = recall_at(searcher.raw(xq, 10, {"nprobe": 1})[1], truth)
    every = recall_at(searcher.raw(xq, 10, {"nprobe": 64})[1], truth)
    assert every == pytest.approx(1.0) and one < 0.9
    assert ann.knobs_of(indexes["IVF64,Flat"]) == {"nprobe": 1}  # per-call parameters leave the index alone


@pytest.mark.parametrize("factory", ["IVF64,Flat", "HNSW16"])
def test_autotune_reaches_the_target_recall(data, factory: str) -> None:
    """The chosen value reaches the target on held-out queries, and the next smaller one does not: it is the
    cheapest that does."""
    xb, xq = data
    index = build_faiss(xb, np.arange(N, dtype=np.int64), factory, nprobe=1, ef_search=16)
    tuning = autotune(index, xb, target_recall=0.95, k=10, n_queries=400, seed=0)
    (name, value), = tuning.knobs.items()
    assert tuning.reached and tuning.recall >= 0.95 and tuning.heldout_recall >= 0.93
    assert ann.knobs_of(index)[name] == value  # applied to the index (saved with it)
    tried = dict((kn[name], r) for kn, r in tuning.tried)
    smaller = [v for v in tried if v < value]
    assert tried[max(smaller)] < 0.95 if smaller else value == min(tried)
    if name == "nprobe":
        assert value < 64  # not simply exhaustive
    # On queries it never saw (the query set, not item vectors), the tuned index is close to the target too.
    _, found = index.search(xq, 10)
    assert recall_at(found, _exact(xb, xq, 10)) >= 0.9


def test_autotune_exact_index_and_unreachable_target(data, caplog: pytest.LogCaptureFixture) -> None:
    xb, _ = data
    flat = build_faiss(xb, np.arange(N, dtype=np.int64), "Flat")
    assert autotune(flat, xb).knobs == {}
    pq = build_faiss(xb, np.arange(N, dtype=np.int64), "IVF16,PQ4x4", nprobe=1)  # 2 bytes a vector: coarse
    with caplog.at_level(logging.WARNING, logger="index.ann"):
        tuning = autotune(pq, xb, target_recall=0.99, n_queries=200)
    assert not tuning.reached and tuning.recall < 0.99
    assert "NOT reached" in caplog.text


def test_training_sample_is_capped_and_seeded(data) -> None:
    xb, xq = data
    ids = np.arange(N, dtype=np.int64)
    a = build_faiss(xb, ids, "IVF16,Flat", train_size=700, seed=1)  # 40 per list (640) < 700 < 4000
    b = build_faiss(xb, ids, "IVF16,Flat", train_size=700, seed=1)
    c = build_faiss(xb, ids, "IVF16,Flat", train_size=700, seed=2)

    def centroids(index):
        return faiss.extract_index_ivf(ann.unwrap(index)[0]).quantizer.reconstruct_n(0, 16)

    np.testing.assert_array_equal(centroids(a), centroids(b))
    assert not np.allclose(centroids(a), centroids(c))
