"""Fine-tuning the LLM reranker with LoRA on the trained retriever's own mistakes (LlamaRec's recipe).

Training users only. A user's example is its training prefix (``train_seq[:-1]``) and the next training item
(``train_seq[-1]``); the validation and test targets are never read. The candidates are the retriever's own top-N
for that prefix, so the negatives are its real mistakes; when it missed the true item, that item replaces the
lowest-ranked candidate. The candidate order is shuffled at every step against position bias.

- ``listwise``: cross-entropy over the candidates' letter logits at the answer position (one pass per user).
- ``pointwise``: binary cross-entropy on the yes/no log-odds of the true item and ``rerank.negatives`` hard
  negatives drawn from the same top-N, all sharing the history's KV cache.
- ``sequence``: cross-entropy over the candidates' scores from the item-sequence cross-encoder
  (``rerank/sequence.py``: the user tower's LLM layers, new LoRA adapters and a scoring head), one pass per
  list. Its lists are cheap (one position per item), so it trains on the last ``SEQUENCE_POSITIONS`` training
  items of every user by default, and only on the lists that hold their target (``missed_targets: auto`` skips
  the others: a target inserted by hand is an odd one out that served lists never have; the choice was made
  on validation users, docs/rerank.md). Its lists are not
  shuffled: a candidate's score does not depend on the order. Its step 0 scores every candidate 0: the
  retriever's own order.

Early stopping reads the validation NDCG@10 of the reranked top-N as it would be served: ``z(retrieval) +
w * z(llm)`` with the fusion weight ``w`` that suits that adapter best on the validation users (their validation
target, history = their training items), never on test. The best adapter and its weight are saved in the run's
``rerank/`` folder, which ``rerank.Pipeline`` loads. Step 0 is the zero-shot model (LoRA starts as the identity), so
fine-tuning never serves anything worse on validation than the zero-shot reranker.

The helpers that score a list of examples (:func:`retriever_candidates`, :func:`llm_scores`,
:func:`rerank_metrics`, :func:`tune_weight`) also serve the benchmark (``benchmarks/bench_rerank.py``).
"""

from __future__ import annotations

import dataclasses
import logging
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from configs import Config, RerankConfig, config_from_dict
from data.protocol import Split, held_out, list_rank, ranking_metrics, split_catalog
from data.rundir import RunDir
from errors import ConfigError, QueryError
from rerank.llm import LLMReranker, fuse
from rerank.pipeline import Pipeline
from rerank.sequence import SequenceReranker
from towers.progress import tqdm
from train.adapters import fit_adapter

logger = logging.getLogger(__name__)

WEIGHTS = (0.0, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 10.0, 100.0)  # fusion weights tried (100 ~ LLM alone)
LLM_ONLY = 100.0
SEQUENCE_POSITIONS = 16  # rerank.train_positions=0 (auto) in sequence mode: examples per training user
SEQUENCE_BATCH = 16  # rerank.train_batch=0 (auto) in sequence mode: lists per step
SEQUENCE_LR = 5e-4  # rerank.lr=0 (auto) in sequence mode
CANDIDATE_BATCH = 256  # users per retrieval batch when collecting the retriever's candidates
TEXT_LR = 2e-4  # rerank.lr=0 (auto) in the listwise and pointwise modes
DEPTH = 20  # metrics are read within the reranked top-N; a target outside it is a miss at every cut-off


@dataclass
class Example:
    """One user's reranking task, in the recommender's index-table rows."""

    user: int  # split user index
    history: list[int]  # rows the reranker reads, oldest first
    target: int  # row of the item to find
    candidates: list[int]  # the retriever's top-N rows, best first
    retrieval: np.ndarray  # (N,) their retrieval scores

    @property
    def hit(self) -> bool:
        return self.target in self.candidates


def held_out_example(split: Split, u: int, which: Literal["train", "valid", "test"],
                     back: int = 0) -> tuple[int, np.ndarray] | None:
    """``(target, history)`` in split indices: ``train`` = user ``u``'s training item ``back`` positions before
    the last one, after the training items before it; ``valid`` / ``test`` = case ``u`` as in
    :func:`data.protocol.held_out` (user ``u`` under the warm protocol). ``None`` when that history would be
    empty."""
    if which == "train":
        train_seq = split.train_seq(u)  # never a held-out item, a new item or a cold user's
        end = len(train_seq) - back  # never a negative (wrapping) slice end
        if end < 2:
            return None
        return int(train_seq[end - 1]), train_seq[:end - 1]
    if which in ("valid", "test"):
        target, history, _ = held_out(split, u, which)
        return (target, history) if len(history) else None
    raise ValueError(f"which must be 'train', 'valid' or 'test', got {which!r}")


def item_matrix(rec: Pipeline) -> np.ndarray:
    """``(N, D)`` item embeddings in the recommender's row order (kept beside the index, or read back from it)."""
    if rec.vectors is not None:
        return np.asarray(rec.vectors, dtype=np.float32)
    return np.stack([rec.index.reconstruct(int(f)) for f in rec.faiss_ids]).astype(np.float32)


def retriever_candidates(rec: Pipeline, split: Split, users: Sequence[int], which: Literal["train", "valid", "test"],
                         depth: int, batch_size: int = CANDIDATE_BATCH, progress: bool = False,
                         positions: int = 1) -> list[Example]:
    """The retriever's exact top-``depth`` for each user's ``which`` history, over the split's items, history
    excluded (but never the target, as in :func:`data.protocol.held_out`). For ``train``, ``positions`` > 1
    also makes examples of the training items before the last one (each with the history before it)."""
    split_rows = np.asarray(rec._rows(split.item_ids, "split items"), dtype=np.int64)
    items = torch.from_numpy(item_matrix(rec)[split_rows])  # (I, D)
    tasks = []
    for u in users:
        for back in range(positions if which == "train" else 1):
            task = held_out_example(split, u, which, back)
            if task is not None:
                tasks.append((u, *task))
    out = []
    for start in tqdm(range(0, len(tasks), batch_size), desc=f"retrieving ({which})", disable=not progress):
        chunk = tasks[start:start + batch_size]
        users_emb = torch.from_numpy(rec.embed_histories([[split.item_ids[j] for j in h] for _, _, h in chunk]))
        scores = users_emb.float() @ items.T  # (B, I)
        for b, (_, target, history) in enumerate(chunk):
            seen = history[history != target]
            if len(seen):
                scores[b, torch.from_numpy(np.asarray(seen, dtype=np.int64))] = float("-inf")
        top = scores.topk(min(depth, scores.shape[1]), dim=1)
        for b, (u, target, history) in enumerate(chunk):
            keep = torch.isfinite(top.values[b])
            out.append(Example(u, split_rows[history].tolist(), int(split_rows[target]),
                               split_rows[top.indices[b][keep].numpy()].tolist(), top.values[b][keep].numpy()))
    return out


def llm_scores(rr: LLMReranker, examples: Sequence[Example], titles: Sequence[str], batch_users: int = 8,
               progress: bool = False, latencies: list[tuple[float, float]] | None = None) -> list[torch.Tensor]:
    """The reranker's ``(N,)`` scores of each example's candidates, in its configured mode.

    ``batch_users`` users share a call (listwise prompts then share forward passes); with ``latencies`` given,
    each user is scored alone and ``(wall, cpu)`` seconds of the call are appended, as a served query would be
    (the CPU time of all threads tells the cost where other jobs share the machine).
    """
    was_training = rr.training
    rr.eval()
    out: list[torch.Tensor] = []
    step = 1 if latencies is not None else batch_users
    try:
        for start in tqdm(range(0, len(examples), step), desc=f"scoring ({rr.cfg.mode})", disable=not progress):
            chunk = examples[start:start + step]
            t0, c0 = time.perf_counter(), time.process_time()
            if isinstance(rr, SequenceReranker):
                out += rr.score_rows([e.history for e in chunk], [e.candidates for e in chunk])
            else:
                out += rr.score_batch([rr.history.build(e.history).input_ids for e in chunk],
                                      [[titles[c] for c in e.candidates] for e in chunk])
            if latencies is not None:
                latencies.append((time.perf_counter() - t0, time.process_time() - c0))
    finally:
        rr.train(was_training)
    return out


def reranked_ranks(examples: Sequence[Example], scores: Sequence[torch.Tensor] | None, weight: float) -> np.ndarray:
    """0-based rank of each target in its reranked top-N (``len`` = a miss); ``scores=None``: retrieval order."""
    ranks = []
    for i, e in enumerate(examples):
        order = list(range(len(e.candidates)))
        if scores is not None and len(order) > 1:
            final = fuse(torch.from_numpy(e.retrieval), scores[i], weight)
            order = torch.argsort(final, descending=True, stable=True).tolist()
        ranks.append(list_rank([e.candidates[o] for o in order], e.target, DEPTH))
    return np.asarray(ranks)


def rerank_metrics(examples: Sequence[Example], scores: Sequence[torch.Tensor] | None, weight: float) -> dict:
    """Recall, NDCG and MRR at 5, 10 and 20 of the (re)ranked lists, rounded to 4 decimals."""
    return {k: round(v, 4) for k, v in ranking_metrics(reranked_ranks(examples, scores, weight), (5, 10, 20)).items()}


def tune_weight(examples: Sequence[Example], scores: Sequence[torch.Tensor]) -> tuple[float, dict]:
    """The fusion weight (from :data:`WEIGHTS`) with the best NDCG@10 on these (validation) examples, the
    smallest on ties; and the NDCG@10 of every weight tried."""
    table = {w: rerank_metrics(examples, scores, w)["ndcg@10"] for w in WEIGHTS}
    best = max(table.values())
    return min(w for w, v in table.items() if v == best), table


def two_fold_gain(examples: Sequence[Example], scores: Sequence[torch.Tensor], splits: int = 100,
                  seed: int = 0) -> dict:
    """The fused NDCG@10 gain over retrieval with the fusion weight tuned on one half of these (validation) users
    and read on the other half, both ways, over ``splits`` seeded random halvings: a less optimistic estimate than
    the gain read on the very users the weight was tuned on. Returns the mean relative gain and its 5th and
    95th percentiles (how much two halves of these users can disagree). The adapter itself (its early-stopping
    step) was still chosen on all of these users, so even this figure leans optimistic."""
    ranks = {w: reranked_ranks(examples, scores, w) for w in WEIGHTS}  # weight 0: the retriever's own order

    def ndcg(w: float, users: np.ndarray) -> float:
        return ranking_metrics(ranks[w][users], (10,))["ndcg@10"]

    rng = np.random.default_rng(seed)
    gains = []
    for _ in range(splits):
        order = rng.permutation(len(examples))
        halves = order[: len(order) // 2], order[len(order) // 2:]
        for tune, held in (halves, halves[::-1]):
            w = max(WEIGHTS, key=lambda w: (ndcg(w, tune), -w))  # the smallest weight on ties, as tune_weight
            base = ndcg(0.0, held)
            if base > 0:
                gains.append(ndcg(w, held) / base - 1)
    if not gains:
        return {"gain": 0.0, "p5": 0.0, "p95": 0.0}
    return {"gain": round(float(np.mean(gains)), 4), "p5": round(float(np.percentile(gains, 5)), 4),
            "p95": round(float(np.percentile(gains, 95)), 4)}


@dataclass
class RerankResult:
    """What :func:`train_reranker` did: the saved adapter, the tuned weight and the validation figures."""

    run_dir: Path
    mode: str
    weight: float
    best_step: int
    steps: int
    seconds: float
    valid: dict  # retrieval, zero_shot (LLM alone), fine_tuned (LLM alone) and fused, on the validation users
    history: list[dict] = field(default_factory=list)  # one record per validation


def require_unseen_validation(run: RunDir) -> None:
    """Refuse a run whose towers trained on its validation targets (``train.refit``, in ``metrics.json``).

    Under the warm protocol the refit model served by such a run has seen every user's validation item, so its
    validation top-N holds the target far more often than it would for an unseen item: a fusion weight, an early
    stop or a benchmark read on those users would measure memory, not ranking. The cold protocols' validation
    cases stay unseen through a refit (their items or users are never trained on), so those runs pass.
    """
    refit = run.read_metrics().get("refit") if run.metrics_path.is_file() else None
    if refit and run.read_config().data.protocol == "warm":
        raise ConfigError(f"{run.path}: its towers were refit with every user's validation item (train.refit, "
                          f"{refit['epochs']} epochs), so its validation users cannot tune or judge a reranker; "
                          "train the run with --set train.refit=false for that")


def rerank_config(run: RunDir, mode: str | None, overrides: Sequence[str], command: str = "train-rerank") -> Config:
    """The run's config with ``rerank.*`` overrides (``mode`` too); other sections cannot change here."""
    for o in overrides:
        if not o.strip().startswith("rerank."):
            raise ConfigError(f"--set {o}: {command} changes rerank.* settings only")
    tree = run.read_config().to_dict()
    if mode is not None:
        tree["rerank"]["mode"] = mode
    return config_from_dict(tree, list(overrides))


def train_reranker(run_dir: str | Path, mode: Literal["listwise", "pointwise", "sequence"] | None = None,
                   overrides: Sequence[str] = (), catalog_dir: str | Path | None = None, device: str = "auto",
                   progress: bool = True, recommender: Pipeline | None = None) -> RerankResult:
    """Fine-tune the reranker of a trained run with LoRA and save it into ``run_dir/rerank/<mode>.*``.

    Args:
        run_dir: a trained run with a built index (its retriever supplies the candidates).
        mode: ``listwise``, ``pointwise`` or ``sequence`` (default: the run's ``rerank.mode``).
        overrides: ``rerank.field=value`` settings (``rerank.train_users``, ``rerank.epochs``, ``rerank.lr``,
            ``rerank.max_minutes``, ``rerank.lora_layers``, ...), checked like a config file.
        catalog_dir: the training catalog's new location, if it moved (its content must be unchanged).
        device: ``auto``, ``cpu``, ``cuda``...
        recommender: an already loaded :class:`rerank.Pipeline` of ``run_dir`` (its towers and index are reused).
    """
    t_start, cpu_start = time.time(), time.process_time()
    run = RunDir(run_dir).require()
    require_unseen_validation(run)
    config = rerank_config(run, mode, overrides)
    cfg: RerankConfig = config.rerank
    rec = recommender or Pipeline.load(run.path, device=device)
    rec.configure_rerank(**dataclasses.asdict(cfg))
    split = split_catalog(config, run.load_catalog(catalog_dir))
    rng = random.Random(cfg.seed)
    torch.manual_seed(cfg.seed)

    users = [u for u in range(split.num_users) if u not in split.cold_users]
    cases = list(range(split.num_cases("valid")))  # every user, or the protocol's validation cases
    train_users = sorted(rng.sample(users, cfg.train_users)) if 0 < cfg.train_users < len(users) else users
    valid_users = sorted(rng.sample(cases, cfg.eval_users)) if 0 < cfg.eval_users < len(cases) else cases
    positions = cfg.train_positions or (SEQUENCE_POSITIONS if cfg.mode == "sequence" else 1)
    batch_size = cfg.train_batch or (SEQUENCE_BATCH if cfg.mode == "sequence" else 4)
    train_ex = retriever_candidates(rec, split, train_users, "train", cfg.candidates, progress=progress,
                                    positions=positions)
    valid_ex = retriever_candidates(rec, split, valid_users, "valid", cfg.candidates, progress=progress)
    if not train_ex:
        raise QueryError(f"no training user of {run.path} has a training prefix to fine-tune on")
    logger.info("reranker fine-tuning (%s): %d training examples of %d users (retriever top-%d holds the target "
                "for %.0f%%), %d validation users (%.0f%%)", cfg.mode, len(train_ex), len({e.user for e in train_ex}),
                cfg.candidates, 100 * np.mean([e.hit for e in train_ex]), len(valid_ex),
                100 * np.mean([e.hit for e in valid_ex]))
    missed = cfg.missed_targets if cfg.missed_targets != "auto" else ("skip" if cfg.mode == "sequence" else "insert")
    if missed == "skip":
        train_ex = [e for e in train_ex if e.hit]
        if not train_ex:
            raise QueryError(f"the retriever of {run.path} misses every training target in its top-{cfg.candidates}: "
                             "nothing to fine-tune on with rerank.missed_targets=skip")
    for e in train_ex:  # the true item replaces the retriever's lowest-ranked candidate when it was missed
        if not e.hit:
            e.candidates[-1] = e.target

    rr = rec.build_reranker(adapter=False)  # from the base model, even where the run has an adapter already
    rr.add_lora()
    lr = cfg.lr or (SEQUENCE_LR if cfg.mode == "sequence" else TEXT_LR)

    zero_shot_scores: list[torch.Tensor] = []

    def validate(step: int, loss: float) -> tuple[float, dict, list]:
        """Score the validation users; the step's score is the reranked list's NDCG@10, fused with the retrieval
        score at the weight that suits it best."""
        scores = llm_scores(rr, valid_ex, rec.titles, progress=False)
        if step == 0:
            zero_shot_scores[:] = scores
        alone = rerank_metrics(valid_ex, scores, LLM_ONLY)
        weight, table = tune_weight(valid_ex, scores)
        logger.info("reranker step %d loss %.4f valid ndcg@10 %.4f fused (weight %g), %.4f LLM alone", step, loss,
                    table[weight], weight, alone["ndcg@10"])
        return table[weight], {"loss": loss, "seconds": round(time.time() - t_start, 1),
                               "fused_ndcg@10": table[weight], "weight": weight, **alone}, scores

    def step_loss(batch: list[Example]) -> float:
        if cfg.mode == "listwise":
            return _listwise_loss(rr, batch, rec.titles, rng)
        if cfg.mode == "pointwise":
            return _pointwise_loss(rr, batch, rec.titles, rng, cfg.negatives)
        return _sequence_loss(rr, batch)

    fit = fit_adapter(rr, train_ex, step_loss, validate, epochs=cfg.epochs, batch_size=batch_size, lr=lr,
                      eval_every=cfg.eval_every, patience=cfg.patience, max_minutes=cfg.max_minutes, rng=rng,
                      desc=f"fine-tuning ({cfg.mode})", progress=progress)
    step, history, best_scores = fit.steps, fit.best.history, fit.best.state[1]
    zero_shot = history[0]
    weight, table = tune_weight(valid_ex, best_scores)
    zero_shot_weight, _ = tune_weight(valid_ex, zero_shot_scores)
    rr.weight = weight
    valid = {
        "users": len(valid_ex),
        "retrieval": rerank_metrics(valid_ex, None, 0.0),
        "zero_shot_llm_alone": {k: v for k, v in zero_shot.items() if "@" in k and not k.startswith("fused")},
        "zero_shot_weight": zero_shot_weight,  # the zero-shot reranker's own tuned fusion weight (for comparison)
        "zero_shot_fused": rerank_metrics(valid_ex, zero_shot_scores, zero_shot_weight),
        "fine_tuned_llm_alone": rerank_metrics(valid_ex, best_scores, LLM_ONLY),
        "fused": rerank_metrics(valid_ex, best_scores, weight),
        "ndcg@10_by_weight": {str(w): v for w, v in table.items()},
        "two_fold": two_fold_gain(valid_ex, best_scores, seed=cfg.seed),  # the weight tuned on the other half
    }
    seconds = time.time() - t_start
    cpu_seconds = time.process_time() - cpu_start  # every thread's CPU time: on a shared machine, the honest cost
    rr.save_adapter(run.path, {
        "best_step": fit.best.step, "steps": step, "seconds": round(seconds, 1), "cpu_seconds": round(cpu_seconds, 1),
        "threads": torch.get_num_threads(), "train_users": len({e.user for e in train_ex}),
        "train_examples": len(train_ex), "train_positions": positions, "train_batch": batch_size, "lr": lr,
        "missed_targets": missed,
        "settings": dataclasses.asdict(cfg), "valid": valid, "history": history,
    })
    logger.info("reranker (%s) saved: best step %d of %d, fusion weight %g, valid ndcg@10 %.4f -> %.4f (%+.1f%%; "
                "%+.1f%% with the weight tuned on the other half of the users, 5-95%%: %+.1f%% to %+.1f%%)",
                cfg.mode, fit.best.step, step, weight, valid["retrieval"]["ndcg@10"], valid["fused"]["ndcg@10"],
                100 * (valid["fused"]["ndcg@10"] / max(valid["retrieval"]["ndcg@10"], 1e-12) - 1),
                *(100 * valid["two_fold"][k] for k in ("gain", "p5", "p95")))
    return RerankResult(run.path, cfg.mode, weight, fit.best.step, step, seconds, valid, history)


def _listwise_loss(rr: LLMReranker, batch: list[Example], titles: Sequence[str], rng: random.Random) -> float:
    """Cross-entropy of the true item's letter among the candidates' letters, candidates shuffled; backward done."""
    prompts, labels, sizes = [], [], []
    for e in batch:
        order = rng.sample(e.candidates, len(e.candidates))
        prompts.append(rr.list_prompt(rr.history.build(e.history).input_ids, [titles[c] for c in order]))
        labels.append(order.index(e.target))
        sizes.append(len(order))
    logits = rr.letter_logits(prompts)  # (B, 26)
    n = torch.arange(logits.shape[1], device=logits.device)
    logits = logits.masked_fill(n[None, :] >= torch.tensor(sizes, device=logits.device)[:, None], float("-inf"))
    loss = torch.nn.functional.cross_entropy(logits, torch.tensor(labels, device=logits.device))
    loss.backward()
    return float(loss.detach())


def _sequence_loss(rr: SequenceReranker, batch: list[Example]) -> float:
    """Cross-entropy of the true item among each list's candidates (their scores read in one pass per list);
    backward done. The scores do not depend on the candidates' order, so there is no order to shuffle."""
    scores = rr([e.history for e in batch], [e.candidates for e in batch])  # (B, C)
    sizes = torch.tensor([len(e.candidates) for e in batch], device=scores.device)
    scores = scores.masked_fill(torch.arange(scores.shape[1], device=scores.device)[None, :] >= sizes[:, None],
                                float("-inf"))
    labels = torch.tensor([e.candidates.index(e.target) for e in batch], device=scores.device)
    loss = torch.nn.functional.cross_entropy(scores, labels)
    loss.backward()
    return float(loss.detach())


def _pointwise_loss(rr: LLMReranker, batch: list[Example], titles: Sequence[str], rng: random.Random,
                    negatives: int) -> float:
    """Balanced binary cross-entropy of yes/no log-odds: the true item against hard negatives; backward done."""
    total = 0.0
    for e in batch:
        others = [c for c in e.candidates if c != e.target]
        chosen = [e.target] + rng.sample(others, min(negatives, len(others)))
        rng.shuffle(chosen)
        labels = torch.tensor([float(c == e.target) for c in chosen])
        lo = rr.log_odds_train(rr.history.build(e.history).input_ids, [titles[c] for c in chosen]).float().cpu()
        weights = torch.where(labels > 0, float(len(chosen) - 1), 1.0)  # the positive weighs as all negatives
        loss = torch.nn.functional.binary_cross_entropy_with_logits(lo, labels, weight=weights) / len(batch)
        loss.backward()
        total += float(loss.detach())
    return total
