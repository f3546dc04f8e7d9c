"""End-to-end evaluation of a served run under the published protocol (leave-one-out, full ranking).

Each user's history is everything but the held-out test item; candidates are retrieved from the live index,
restricted to the items of the k-core split and with the history excluded, then optionally reranked.
"""

from __future__ import annotations

import json
import logging
import random
import time
from pathlib import Path

from tqdm.auto import tqdm

from index.recommender import Recommender
from train.data import load_catalog
from train.loop import split_catalog
from train.metrics import ranking_metrics

logger = logging.getLogger(__name__)

KS = (5, 10, 20)


def evaluate(run_dir: str | Path, users: int = 0, seed: int = 0, rerank: bool = True, batch_size: int = 64,
             progress: bool = True, recommender: Recommender | None = None) -> dict:
    """Recall/NDCG/MRR at 5, 10 and 20, with and without LLM rerank.

    Args:
        run_dir: a trained run with a built index.
        users: evaluate a seeded random sample of this many users (0 = all users).
        seed: seed of that sample.
        rerank: also score the reranked lists.
    """
    run_dir = Path(run_dir)
    rec = recommender or Recommender.load(run_dir)
    info = json.loads((run_dir / "catalog.json").read_text())
    catalog = load_catalog(info["path"])
    split = split_catalog(rec.config, catalog)
    chosen = list(range(split.num_users))
    if users and users < len(chosen):
        chosen = sorted(random.Random(seed).sample(chosen, users))
    allowed = split.item_ids
    depth = max(KS)
    ranks = {"retrieval": [], "reranked": []}
    timings = {"retrieval": 0.0, "reranked": 0.0}
    for start in tqdm(range(0, len(chosen), batch_size), desc="evaluating", disable=not progress):
        idx = chosen[start:start + batch_size]
        histories = [[split.item_ids[j] for j in split.sequences[u][:-1]] for u in idx]
        targets = [split.item_ids[split.test_target(u)] for u in idx]
        t0 = time.time()
        n_cand = max(depth, rec.config.rerank.candidates)
        lists = rec.recommend_batch(histories=histories, k=n_cand, rerank=False, allowed=allowed)
        timings["retrieval"] += time.time() - t0
        for h, recs, target in zip(histories, lists, targets):
            ranks["retrieval"].append(_rank([r.item_id for r in recs[:depth]], target, depth))
            if rerank:
                t0 = time.time()
                reranked = rec.rerank(h, recs[: rec.config.rerank.candidates]) + recs[rec.config.rerank.candidates:]
                timings["reranked"] += time.time() - t0
                ranks["reranked"].append(_rank([r.item_id for r in reranked[:depth]], target, depth))
    out = {"users": len(chosen), "items": split.num_items, "protocol": "5-core leave-one-out, full ranking",
           "rerank_candidates": rec.config.rerank.candidates, "rerank_weight": rec.config.rerank.weight}
    for name, r in ranks.items():
        if r:
            out[name] = {k: round(v, 4) for k, v in ranking_metrics(r, KS).items()}
            out[name]["seconds"] = round(timings[name], 1)
    return out


def _rank(ids: list, target, depth: int) -> int:
    """0-based position of ``target`` in a ranked list, or ``depth`` (a miss at every cut-off) if absent."""
    return ids.index(target) if target in ids else depth
