"""End-to-end evaluation of a served run under the published protocol (leave-one-out, full ranking).

Each user's history is everything but the held-out test item; candidates are retrieved from the live index,
restricted to the items of the k-core split and with the history excluded (the target never is: see
:func:`data.protocol.held_out`, which the training loop uses too), then optionally reranked by the
recommender given (a :class:`rerank.Pipeline`: this module only calls its ``rerank``).
"""

from __future__ import annotations

import logging
import random
import time
from pathlib import Path

import torch

from data.protocol import COLD_SHARE_AT, held_out, list_rank, protocol_metrics, split_catalog
from data.rundir import RunDir
from errors import QueryError
from index.recommender import Recommender
from towers.progress import tqdm

logger = logging.getLogger(__name__)

KS = (5, 10, 20)


def evaluate(run_dir: str | Path, users: int = 0, seed: int = 0, rerank: bool = True, batch_size: int = 64,
             progress: bool = True, recommender: Recommender | None = None,
             catalog_dir: str | Path | None = None) -> dict:
    """Recall/NDCG/MRR at 5, 10 and 20, with and without LLM rerank.

    Args:
        run_dir: a trained run with a built index.
        users: evaluate a seeded random sample of this many users (0 = all users).
        seed: seed of that sample.
        rerank: also score the reranked lists; needs a ``recommender`` with a ``rerank`` stage
            (:class:`rerank.Pipeline`).
        recommender: an already loaded recommender of ``run_dir`` (default: :meth:`Recommender.load`).
        catalog_dir: where the training catalog is now, if it moved (its content must be unchanged).
    """
    if isinstance(users, bool) or not isinstance(users, int) or users < 0:
        raise QueryError(f"--users must be 0 (all users) or a positive number, got {users!r}")
    if batch_size < 1:
        raise QueryError(f"batch_size must be at least 1, got {batch_size}")
    run = RunDir(run_dir).require()
    catalog = run.load_catalog(catalog_dir)  # refuses a catalog that changed since training
    rec = recommender or Recommender.load(run.path)
    if rerank and not callable(getattr(rec, "rerank", None)):
        raise QueryError("rerank=True needs a recommender with a rerank stage: pass rerank.Pipeline.load(run)")
    split = split_catalog(rec.config, catalog)  # under the protocol the run was trained for
    chosen = list(range(split.num_cases("test")))
    if users and users < len(chosen):
        chosen = sorted(random.Random(seed).sample(chosen, users))
    allowed = split.item_ids
    depth = max(KS)
    n_cand = max(depth, rec.config.rerank.candidates)
    ranks = {"retrieval": [], "reranked": []}
    tops = {"retrieval": [], "reranked": []}  # split indices of each top 10 (cold-items' cold_share@10)
    index_of = {item_id: j for j, item_id in enumerate(split.item_ids)}
    timings = {"retrieval": 0.0, "reranked": 0.0}
    for start in tqdm(range(0, len(chosen), batch_size), desc="evaluating", disable=not progress):
        held = [held_out(split, u, "test") for u in chosen[start:start + batch_size]]
        targets = [split.item_ids[t] for t, _, _ in held]
        histories = [[split.item_ids[j] for j in h] for _, h, _ in held]
        excluded = [[split.item_ids[j] for j in ex] for _, _, ex in held]
        t0 = time.time()
        # The history is excluded as the protocol says (a re-watched target stays), hence the vector-level call.
        lists = rec.results(rec.search_vectors(rec.embed_histories(histories), k=n_cand, exclude=excluded,
                                               allow=allowed))
        timings["retrieval"] += time.time() - t0
        for h, recs, target in zip(histories, lists, targets):
            ranks["retrieval"].append(list_rank([r.item_id for r in recs], target, depth))
            tops["retrieval"].append([index_of[r.item_id] for r in recs[:COLD_SHARE_AT]])
            if rerank:
                t0 = time.time()
                top = rec.config.rerank.candidates
                reranked = rec.rerank(h, recs[:top]) + recs[top:]
                timings["reranked"] += time.time() - t0
                ranks["reranked"].append(list_rank([r.item_id for r in reranked], target, depth))
                tops["reranked"].append([index_of[r.item_id] for r in reranked[:COLD_SHARE_AT]])
    out = {"users": len(chosen), "items": split.num_items, "protocol": split.protocol,
           "rerank_candidates": rec.config.rerank.candidates, "rerank_weight": rec.config.rerank.weight}
    for name, r in ranks.items():
        if r:
            top = torch.tensor(tops[name]) if all(len(t) == COLD_SHARE_AT for t in tops[name]) else None
            metrics = protocol_metrics(split, "test", r, top, chosen, KS)
            metrics.pop("users")
            out[name] = _rounded(metrics)
            out[name]["seconds"] = round(timings[name], 1)
    return out


def _rounded(metrics: dict) -> dict:
    return {k: _rounded(v) if isinstance(v, dict) else round(v, 4) if isinstance(v, float) else v
            for k, v in metrics.items()}
