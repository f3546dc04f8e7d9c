"""Personalised reasons: measuring them on held-out users, and fine-tuning the LM that writes them (LoRA, peft).

A reason is judged on users' held-out items (an item they really went on to engage with), against the evidence
of the data the reason may use: the co-occurrence of items in the other users' histories *before* the held-out
point (``rerank.reasons.CoOccurrence`` over the training sequences; for the test split, the sequences up to the
validation item), and the catalog's genres. Per reason:

- ``llm``: written by the LM and grounded (else the template fallback);
- ``two_cites``: it cites two history items;
- ``evidence``: the mean co-occurrence strength of the items it cites with the recommendation, and
  ``top_evidence``: it cites the shown history item with the strongest co-occurrence (users where one has any);
- ``claims``: it names a genre, and ``claim_precision``: every genre it names is one the recommendation shares
  with an item it cites (the only genre claim the data can back);
- ``words``: words after the last quote, beyond the titles;
- latency of one ``Pipeline.explain`` call.
"""

from __future__ import annotations

import dataclasses
import logging
import random
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from data.items import pad_batch
from data.protocol import Split, held_out
from errors import QueryError
from rerank.llm import LLMReranker
from rerank.pipeline import EXPLAIN_CANDIDATES, Pipeline
from rerank.reasons import (
    REASONS,
    Ask,
    CoOccurrence,
    Explainer,
    genre_claims,
    shared_genres,
    template_reason,
)
from towers.progress import tqdm

logger = logging.getLogger(__name__)


def held_out_cooccurrence(split: Split, rows: np.ndarray, which: Literal["valid", "test"]) -> CoOccurrence:
    """Co-occurrence over every user's history before the ``which`` target (``rows``: split item -> index row)."""
    cut = 2 if which == "valid" else 1
    return CoOccurrence([rows[seq[:-cut]] for seq in split.sequences], int(rows.max()) + 1)


def evaluate_reasons(rec: Pipeline, split: Split, users: Sequence[int], which: Literal["valid", "test"],
                     progress: bool = False, examples: list | None = None) -> dict:
    """Write a reason for each user's held-out item after their history and score it (module docstring).

    The recommender's co-occurrence evidence is set to the held-out one (:func:`held_out_cooccurrence`), so no
    reason leans on the very interactions it is judged on. ``examples``, when given, receives
    ``(user, history rows, target row, reason)`` tuples.
    """
    rows = np.asarray(rec._rows(split.item_ids, "split items"), dtype=np.int64)
    co = held_out_cooccurrence(split, rows, which)
    rec.cooccurrence = co
    genres, vocab = rec.genres, rec._genre_vocabulary  # no vocabulary: the catalog has no genres column
    per: dict[str, list[float]] = {k: [] for k in ("llm", "two_cites", "evidence", "top_evidence", "claims",
                                                   "claim_precision", "words", "seconds")}
    builder = rec._reason_writer().rr.history  # the prompt's history, as explain() builds it
    for u in tqdm(users, desc=f"reasons ({which})", disable=not progress):
        target, history, _ = held_out(split, u, which)
        if not len(history):
            continue
        h_rows, t_row = rows[history].tolist(), int(rows[target])
        t0 = time.perf_counter()
        reason = rec.explain([rec.item_ids[r] for r in h_rows], [rec.item_ids[t_row]])[0]
        per["seconds"].append(time.perf_counter() - t0)
        cites = [rec.index_items.row(c) for c in reason.cites]
        shown = list(dict.fromkeys(builder.build(h_rows).items))
        s_cites, s_shown = co.strength(t_row, cites), co.strength(t_row, shown)
        per["llm"].append(reason.source == "llm")
        per["two_cites"].append(len(cites) >= 2)
        per["evidence"].append(float(s_cites.mean()))
        if s_shown.max() > 0:
            per["top_evidence"].append(bool(s_cites.max() >= s_shown.max()))
        text = str(reason)
        per["words"].append(len(re.findall(r"\w+", text[text.rfind('"') + 1:])))
        if vocab:
            claimed = genre_claims(text, vocab)
            per["claims"].append(bool(claimed))
            if claimed:
                backed = set(genres[t_row]) & {g for c in cites for g in genres[c]}
                per["claim_precision"].append(claimed <= backed)
        if examples is not None:
            examples.append((u, h_rows, t_row, reason))
    out = {k: round(float(np.mean(v)), 4) for k, v in per.items() if v and k != "seconds"}
    out["reasons"] = len(per["llm"])
    lat = np.asarray(per["seconds"])
    out["latency_s"] = {"p50": round(float(np.percentile(lat, 50)), 3), "p95": round(float(np.percentile(lat, 95)), 3)}
    return out


# -- fine-tuning ---------------------------------------------------------------------------------------------

REASONS_USERS = 400  # rerank.train_users=0 (auto): a seeded sample of training users (the sentence is learnt fast)
REASONS_POSITIONS = 1  # rerank.train_positions=0 (auto): reasons per training user (its last training items)
REASONS_BATCH = 8  # rerank.train_batch=0 (auto): reasons per optimizer step
REASONS_LR = 1e-3  # rerank.lr=0 (auto)
REASONS_VALID = 100  # validation users whose reasons are generated at each validation (at most)


@dataclass
class ReasonTask:
    """One reason to write: the prompt (profile and tail, ending with the opening quote) and the target tokens."""

    user: int
    profile: list[int]  # the history prompt
    prompt: list[int]  # the profile, then the ask's tail
    ask: Ask
    target: list[int]  # the continuation that writes `text`
    text: str  # the reason the evidence composes (rerank.reasons.template_reason)


def reason_tasks(rec: Pipeline, explainer: Explainer, co: CoOccurrence, split: Split, rows: np.ndarray,
                 users: Sequence[int], which: Literal["train", "valid"], positions: int = 1) -> list[ReasonTask]:
    """The reasons the evidence composes for users' held-out items (``train``: their last ``positions`` training
    items, each after the training items before it, the user left out of the co-occurrence; ``valid``: the
    validation item), in the prompt the explainer reads."""
    from train.rerank import held_out_example

    genres = rec.genres
    builder = explainer.rr.history
    out = []
    for u in users:
        for back in range(positions if which == "train" else 1):
            task = held_out_example(split, u, which, back)
            if task is None:
                continue
            target, history = task
            t = int(rows[target])
            profile = builder.build(rows[history].tolist())
            shown = list(dict.fromkeys(profile.items))
            related = rec.evidence_rank(shown, t, EXPLAIN_CANDIDATES, co, u if which == "train" else None)
            ask = Ask(rec.titles[t], genres[t], tuple((rec.titles[r], shared_genres(genres[t], [genres[r]], None))
                                                      for r in related))
            cites = related[:2]
            shared = shared_genres(genres[t], [genres[c] for c in cites])
            titles = [rec.titles[c] for c in cites]
            out.append(ReasonTask(u, list(profile.input_ids), list(profile.input_ids) + explainer.prompt_tail(ask), ask,
                                  explainer.continuation_ids(titles, shared), template_reason(titles, shared)))
    return out


def _continuation_loss(rr: LLMReranker, batch: Sequence[ReasonTask]) -> float:
    """Cross-entropy of each task's target tokens after its prompt (teacher forcing); backward done. Logits are
    computed at the target positions only (the 262k-row output projection is most of the cost)."""
    seqs = [t.prompt + t.target for t in batch]
    ids, mask = pad_batch(seqs, rr.tokenizer.pad_token_id)  # right-padded
    device = rr.lm.get_output_embeddings().weight.device
    h = rr.lm.get_decoder()(input_ids=ids.to(device), attention_mask=mask.to(device)).last_hidden_state
    rows = torch.cat([torch.full((len(t.target),), b) for b, t in enumerate(batch)])
    cols = torch.cat([torch.arange(len(t.prompt) - 1, len(t.prompt) + len(t.target) - 1) for t in batch])
    labels = torch.as_tensor([x for t in batch for x in t.target], device=device)
    logits = h[rows.to(device), cols.to(device)].float() @ rr.lm.get_output_embeddings().weight.float().T
    cap = getattr(rr.lm.config, "final_logit_softcapping", None)
    if cap:
        logits = cap * torch.tanh(logits / cap)
    loss = torch.nn.functional.cross_entropy(logits, labels)
    loss.backward()
    return float(loss.detach())


def _written(explainer: Explainer, tasks: Sequence[ReasonTask]) -> dict:
    """Generate the validation tasks' reasons: how many equal the evidence's sentence exactly."""
    texts = explainer.generate_batch([t.profile for t in tasks], [t.ask for t in tasks])
    return {"exact": round(float(np.mean([a == t.text for a, t in zip(texts, tasks)])), 4), "texts": texts}


def train_reasons(run_dir: str | Path, overrides: Sequence[str] = (), catalog_dir: str | Path | None = None,
                  device: str = "auto", progress: bool = True, recommender: Pipeline | None = None) -> dict:
    """Fine-tune the text LM to write reasons, with LoRA, on training users only; save the adapter into
    ``run_dir/rerank/reasons.*``, which ``Pipeline.explain`` then uses.

    The target of each training reason is the sentence the data's evidence composes for the user's next
    training item (:func:`reason_tasks`): the two shown history items that co-occur with it most in *other*
    users' histories (then the most similar by item embedding) and the genres it shares with them. Early
    stopping keeps the step whose reasons for validation users (their validation item, written by constrained
    generation as served) most often equal their evidence's sentence; step 0 is the zero-shot LM.

    ``overrides`` are ``rerank.*`` settings: ``lora_*``, ``lr`` (0: 1e-3), ``epochs``, ``train_users`` (0: 400),
    ``train_positions`` (0: 1 per user), ``train_batch`` (0: 8), ``eval_users`` (at most 100 are generated),
    ``eval_every``, ``patience``, ``max_minutes``, ``seed``.
    """
    from data.protocol import split_catalog
    from data.rundir import RunDir
    from rerank.llm import write_adapter
    from train.adapters import fit_adapter
    from train.rerank import rerank_config

    t_start, cpu_start = time.time(), time.process_time()
    run = RunDir(run_dir).require()
    config = rerank_config(run, None, overrides, "train-reasons")
    cfg = config.rerank
    rec = recommender or Pipeline.load(run.path, device=device)
    rec.configure_rerank(**dataclasses.asdict(cfg))
    # Reasons explain warm recommendations: the leave-one-out split, whatever protocol the towers trained for.
    split = split_catalog(config, run.load_catalog(catalog_dir), protocol="warm")
    rng = random.Random(cfg.seed)
    torch.manual_seed(cfg.seed)
    rows = np.asarray(rec._rows(split.item_ids, "split items"), dtype=np.int64)

    users = list(range(split.num_users))
    n_train = cfg.train_users or REASONS_USERS
    train_users = sorted(rng.sample(users, n_train)) if n_train < len(users) else users
    n_valid = min(cfg.eval_users or len(users), REASONS_VALID, len(users))
    valid_users = sorted(rng.sample(users, n_valid))
    rr = rec.build_reranker(adapter=False, cfg=rec._text_config())
    explainer = Explainer(rr, adapter=True)
    train_co = held_out_cooccurrence(split, rows, "valid")  # the training sequences: no held-out item
    positions = cfg.train_positions or REASONS_POSITIONS
    train = reason_tasks(rec, explainer, train_co, split, rows, train_users, "train", positions)
    valid = reason_tasks(rec, explainer, train_co, split, rows, valid_users, "valid")
    if not train:
        raise QueryError(f"no training user of {run.path} has a training prefix to write a reason for")
    logger.info("reasons fine-tuning: %d training reasons of %d users, %d validation users", len(train),
                len({t.user for t in train}), len(valid))

    rr.add_lora()
    lr = cfg.lr or REASONS_LR
    batch_size = cfg.train_batch or REASONS_BATCH

    def validate(step: int, loss: float) -> tuple[float, dict, None]:
        written = _written(explainer, valid)
        logger.info("reasons step %d loss %.4f: %.1f%% of validation reasons exactly as the evidence composes them",
                    step, loss, 100 * written["exact"])
        return written["exact"], {"loss": loss, "exact": written["exact"],
                                  "seconds": round(time.time() - t_start, 1)}, None

    fit = fit_adapter(rr, train, lambda batch: _continuation_loss(rr, batch), validate, epochs=cfg.epochs,
                      batch_size=batch_size, lr=lr, eval_every=cfg.eval_every, patience=cfg.patience,
                      max_minutes=cfg.max_minutes, rng=rng, desc="fine-tuning (reasons)", progress=progress)
    best, step, history = fit.best, fit.steps, fit.best.history
    record = {"mode": REASONS, "model": rr.model_ref, "lora": rr.adapter, "best_step": best.step, "steps": step,
              "valid_exact": best.score, "valid_users": len(valid), "train_reasons": len(train),
              "train_users": len({t.user for t in train}), "train_positions": positions, "train_batch": batch_size,
              "lr": lr, "seconds": round(time.time() - t_start, 1),
              "cpu_seconds": round(time.process_time() - cpu_start, 1), "threads": torch.get_num_threads(),
              "settings": dataclasses.asdict(cfg), "history": history}
    write_adapter(run.path, REASONS, rr.adapter_state(), record)
    logger.info("reasons adapter saved: best step %d of %d, %.1f%% of validation reasons as the evidence composes "
                "them (zero-shot %.1f%%)", best.step, step, 100 * best.score, 100 * history[0]["exact"])
    rec.configure_rerank()  # the recommender loads the new adapter on next use
    return record
