"""The whole query path: retrieve (:class:`index.recommender.Recommender`), then rerank, then explain.

``Pipeline.load(run_dir).recommend(user_id=..., k=10, rerank=True, explain=True)``. The CLI, the HTTP server and
Python all answer through a :class:`Pipeline`; anything it does not define itself (``similar``, ``history_of``,
``search_vectors``, ``set_search_params``, ``histories``, ``version``...) is its retriever's.
"""

from __future__ import annotations

import dataclasses
import logging
import numbers
import time
from collections.abc import Iterable, Sequence
from pathlib import Path

import polars as pl
import torch

from errors import CheckpointError, ConfigError, QueryError, TowerrecError
from index.batch import Query, retrieve_each
from index.recommender import Recommendation, Recommender, Results, id_list, one_query

logger = logging.getLogger(__name__)

RECOMMEND_ARGS = frozenset({"user_id", "history", "k", "rerank", "exclude", "allow", "deny", "where", "explain"})
EXPLAIN_CANDIDATES = 3  # a reason may quote the history items with the most evidence for the recommendation: this many


class Pipeline:
    """Retrieval by a :class:`Recommender`, then the LLM stages: rerank (``rerank.mode``) and reasons."""

    def __init__(self, retriever: Recommender):
        self.retriever = retriever
        self.config = retriever.config  # its own copy once configure_rerank changes the rerank settings
        self._reranker = None
        self._text_lm = None  # reasons under rerank.mode=sequence: a zero-shot text LM (see _text_reranker)
        self._explainer = None  # reasons: built on first use, for the reranker's LM (rerank.reasons.Explainer)
        self._matcher = None  # catalog titles for grounding reasons (rerank.reasons.TitleMatcher)
        self._reasons_lm = None  # reasons: the LM with the run's fine-tuned reasons adapter (train-reasons)
        self._use_reasons_adapter = True
        self._cooccurrence = None  # reasons' evidence: rerank.reasons.CoOccurrence over the served histories
        self._genres = None  # each index row's genres (rerank.reasons.genre_list), () without a genres column

    @classmethod
    def load(cls, run_dir: str | Path, device: str = "auto", version: str | None = None,
             search_device: str | None = None) -> Pipeline:
        """A pipeline over ``Recommender.load(run_dir, device, version, search_device)``; the LLMs load on first
        use."""
        return cls(Recommender.load(run_dir, device, version, search_device))

    def __getattr__(self, name: str):
        if name.startswith("__") or name == "retriever":
            raise AttributeError(name)
        return getattr(self.retriever, name)

    # -- queries -------------------------------------------------------------------------------------------------
    def recommend(self, user_id=None, history: Sequence | None = None, k: int = 10, rerank: bool | None = None,
                  exclude: Iterable | None = None, allow: Iterable | None = None, deny: Iterable | None = None,
                  where: str | pl.Expr | None = None, explain: bool = False) -> Results:
        """:meth:`Recommender.recommend`, then the LLM stages.

        Args:
            rerank: rerank the retrieved candidates with the LLM (default: the config's ``rerank.enabled``):
                the top ``rerank.candidates`` are retrieved and reordered, then cut to ``k``.
            explain: give each recommendation a short reason grounded in the history (:meth:`explain`; an LM
                pass per query, so off by default): ``reason``, ``reason_source`` and ``reason_cites``.

        The other arguments and the result are :meth:`Recommender.recommend`'s.
        """
        started = time.perf_counter()
        user_ids, histories = one_query(user_id, history)
        return self._recommend(user_ids, histories, k, rerank, None if exclude is None else [exclude], allow,
                               deny, where, explain, started)[0]

    def recommend_batch(self, user_ids: Sequence | None = None, histories: Sequence[Sequence] | None = None,
                        k: int = 10, rerank: bool | None = None, allow: Iterable | None = None,
                        deny: Iterable | None = None, where: str | pl.Expr | None = None,
                        explain: bool = False) -> list[Results]:
        """:meth:`recommend` for many users or histories at once (one retrieval; listwise prompts share forward
        passes). Each result's ``latency_ms`` is the whole batch's."""
        return self._recommend(user_ids, histories, k, rerank, None, allow, deny, where, explain,
                               time.perf_counter())

    def recommend_each(self, calls: Sequence[dict], started: Sequence[float] | None = None) -> list:
        """Many independent :meth:`recommend` calls at once (the server's dynamic batches): ``calls`` holds each
        one's keyword arguments. Every history goes through one user-tower pass, calls with the same filters share
        one search (:func:`index.batch.retrieve_each`), and the calls that rerank share the reranker's batch. A
        bad call fails alone: its slot holds the :class:`errors.TowerrecError` it raised, the others are answered.
        ``started``: when each call arrived (its ``latency_ms`` counts from there; default: now)."""
        now = time.perf_counter()
        started = [now] * len(calls) if started is None else list(started)
        out: list = [None] * len(calls)
        queries, flags = [], []
        for c in calls:
            unknown = set(c) - RECOMMEND_ARGS
            if unknown:
                raise QueryError(f"recommend_each: unknown argument(s) {sorted(unknown)}")
            rerank = self.config.rerank.enabled if c.get("rerank") is None else bool(c["rerank"])
            k = c.get("k", 10)
            queries.append(Query(c.get("user_id"), c.get("history"), k,
                                 self.config.rerank.candidates if rerank else 0, c.get("exclude"), c.get("allow"),
                                 c.get("deny"), c.get("where")))
            flags.append((rerank, bool(c.get("explain", False))))
        found = retrieve_each(self.retriever, queries)
        ok = [i for i, f in enumerate(found) if not isinstance(f, TowerrecError)]
        lists = {i: found[i].lists[0] for i in ok}
        todo = [i for i in ok if flags[i][0]]
        try:
            if todo:
                for i, recs in zip(todo, self.rerank_batch([found[i].histories[0] for i in todo],
                                                           [lists[i] for i in todo])):
                    lists[i] = recs
        except TowerrecError as err:  # the reranker itself failed: every call that asked for it fails with it
            for i in todo:
                found[i] = err
        for i, f in enumerate(found):
            if isinstance(f, TowerrecError):
                out[i] = f
                continue
            k = queries[i].k
            recs = lists[i]
            try:
                if flags[i][1] and recs:
                    recs = [dataclasses.replace(r, reason=str(x), reason_source=x.source, reason_cites=tuple(x.cites))
                            for r, x in zip(recs[:k], self.explain(f.histories[0], recs[:k]))]
                out[i] = self.retriever.answer(f, [recs], k, started[i])[0]
            except TowerrecError as err:
                out[i] = err
        return out

    def _recommend(self, user_ids, histories, k, rerank, exclude, allow, deny, where, explain: bool,
                   started: float) -> list[Results]:
        rerank = self.config.rerank.enabled if rerank is None else bool(rerank)
        depth = self.config.rerank.candidates if rerank else k
        found = self.retriever.retrieve(user_ids, histories, k, depth, exclude, allow, deny, where)
        lists = self.rerank_batch(found.histories, found.lists, k) if rerank else found.lists
        if explain:
            lists = [[dataclasses.replace(r, reason=str(x), reason_source=x.source, reason_cites=tuple(x.cites))
                      for r, x in zip(recs[:k], self.explain(h, recs[:k]))] if recs else recs
                     for h, recs in zip(found.histories, lists)]
        return self.retriever.answer(found, lists, k, started)

    # -- rerank --------------------------------------------------------------------------------------------------
    @property
    def reranker(self):
        """The LLM reranker in the mode of ``rerank.mode``, loaded on first use: with the run's fine-tuned adapter
        for that mode (``towerrec train-rerank``, and the fusion weight tuned with it) when there is one, else
        zero-shot. Its ``history`` builds the history prompt it reads."""
        if self._reranker is None:
            self._reranker = self.build_reranker()
        return self._reranker

    def build_reranker(self, adapter: bool = True, cfg=None):
        """A new :class:`rerank.llm.LLMReranker` as configured (or as ``cfg``, a ``RerankConfig``, says), with
        the run's adapter for its mode when ``adapter`` and there is one, and its ``history`` prompt builder
        attached."""
        from rerank.llm import LLMReranker, history_builder

        rec = self.retriever
        cfg = cfg or self.config.rerank
        if cfg.mode == "sequence":
            return self._sequence_reranker(cfg, adapter)
        ref = cfg.model or self.config.user.model
        rr = LLMReranker(cfg, ref, rec.tokenizer if ref == self.config.user.model else None)
        if adapter:
            rr.load_adapter(rec.run_dir)  # the adapter's own prompt settings replace rr.cfg's
        same = rr.cfg.history_tokens == 0 and rr.tokenizer is rec.tokenizer
        rr.history = rec.builder if same else history_builder(
            self.config.data, rr.cfg, rec.titles, rec.items["text"].to_list(), rr.tokenizer)
        return rr.to(rec.device)

    def _sequence_reranker(self, cfg, adapter: bool):
        """The item-sequence cross-encoder (``rerank.mode: sequence``) from this run's user tower; served only
        fine-tuned (an untrained one scores every candidate alike)."""
        from rerank.sequence import SequenceReranker

        rec = self.retriever
        if rec.vectors is None:
            raise ConfigError("rerank.mode=sequence reads history items as the user tower does: it needs an "
                              "item-sequence user tower (user.input: items); use listwise or pointwise")
        rr = SequenceReranker(cfg, rec.model.user, rec.vectors, rec.id_rows, rec.title_vectors)
        if adapter and not rr.load_adapter(rec.run_dir):
            raise CheckpointError(f"{rec.run_dir} has no fine-tuned sequence reranker: run `towerrec train-rerank "
                                  f"--run {rec.run_dir} --mode sequence` first")
        return rr.to(rec.device)

    def configure_rerank(self, **changes) -> None:
        """Change ``rerank`` settings for this pipeline, e.g. ``configure_rerank(mode="listwise")``.

        The values are checked like a config file's (a bad one is a :class:`ConfigError` naming the field); the
        reranker reloads on next use, with the run's adapter for the new mode if it has one.
        """
        from configs import config_from_dict

        tree = self.config.to_dict()
        tree["rerank"].update(changes)
        self.config = config_from_dict(tree)
        self._reranker = self._text_lm = None
        self._reasons_lm = None

    def rerank(self, history: Sequence, candidates: list[Recommendation], k: int | None = None) -> list[Recommendation]:
        """Reorder retrieved candidates with the LLM reranker given the user's history; returns the top ``k``.

        The first ``rerank.candidates`` (the depth) are reranked: the final score is
        ``z(retrieval) + weight * z(llm)`` within them and ``rerank_score`` is the LLM's score (yes/no log-odds,
        or the letter logit in listwise mode). Candidates beyond the depth follow in retrieval order, unchanged.
        The same set of items comes out as went in.
        """
        return self.rerank_batch([history], [candidates], k)[0]

    def rerank_batch(self, histories: Sequence[Sequence], candidate_lists: Sequence[list[Recommendation]],
                     k: int | None = None) -> list[list[Recommendation]]:
        """:meth:`rerank` for many users; listwise prompts of several users share a forward pass."""
        if len(histories) != len(candidate_lists):
            raise QueryError(f"{len(histories)} histories for {len(candidate_lists)} candidate lists")
        rows = self.retriever._rows
        depth = self.config.rerank.candidates
        todo = [u for u, c in enumerate(candidate_lists) if len(c[:depth]) >= 2]
        llm = []
        if todo:
            rr = self.reranker
            if rr.history is None:  # the sequence cross-encoder reads index rows, not a prompt
                llm = rr.score_rows([rows(histories[u], "history") for u in todo],
                                    [rows([c.item_id for c in candidate_lists[u][:depth]], "candidates")
                                     for u in todo])
            else:
                profiles = [rr.history.build(rows(histories[u], "history")).input_ids for u in todo]
                llm = rr.score_batch(profiles, [[c.title for c in candidate_lists[u][:depth]] for u in todo])
        scores = dict(zip(todo, llm))
        out = []
        for u, cands in enumerate(candidate_lists):
            cands = list(cands)
            if u in scores:
                head = cands[:depth]
                final = self.reranker.combine(torch.tensor([c.retrieval_score for c in head]), scores[u])
                order = torch.argsort(final, descending=True, stable=True).tolist()
                cands = [dataclasses.replace(head[o], score=float(final[o]), rerank_score=float(scores[u][o]))
                         for o in order] + cands[depth:]
            out.append(cands if k is None else cands[:k])
        return out

    # -- reasons -------------------------------------------------------------------------------------------------
    def explain(self, history_or_user, recommendations: Sequence, llm: bool = True) -> list:
        """One short reason per recommendation, grounded in the user's history: a list of
        :class:`rerank.reasons.Reason` (``str(reason)`` is its text; ``cites`` the history item ids it names).

        ``history_or_user`` is a known user id or a history (item ids, oldest first); ``recommendations`` are
        :class:`Recommendation` objects or item ids. The history items the prompt shows are ranked by evidence
        for each recommendation (co-occurrence in the served users' histories, then item-embedding similarity);
        the prompt gives the top ``EXPLAIN_CANDIDATES`` with the genres each shares with the recommendation; the LM
        writes each reason (batched, at most ``rerank.explain_tokens`` tokens), and inside quotes it can only write
        the title of one of them, each at most once. A reason that fails the checks of its form
        (:func:`rerank.reasons.check_reason`: exact history titles, plain words, one short finished sentence), still
        names an item outside the history, cites none, or names a genre the recommendation does not share with an
        item it cites is replaced by the template over the two history items with the most evidence
        (``source="template"``); ``llm=False`` gives the templates alone, with no LM pass.
        """
        from rerank.reasons import (
            Ask,
            Reason,
            check_reason,
            genre_claims,
            ground,
            shared_genres,
            template_reason,
        )

        if isinstance(history_or_user, (str, bytes, numbers.Integral)) and not isinstance(history_or_user, bool):
            history = self.history_of(history_or_user)
        else:
            history = id_list(history_or_user, "history")
        rows = self._rows(history, "history")
        if not rows:
            raise QueryError("empty history: give at least one item id")
        targets = [self.index_items.row(self._key(getattr(r, "item_id", r), "recommendations"))
                   for r in id_list(recommendations, "recommendations")]
        if not targets:
            return []
        genres = self.genres
        texts = [None] * len(targets)
        if llm:
            explainer = self._reason_writer()
            profile = explainer.rr.history.build(rows)
            shown = list(dict.fromkeys(profile.items))
            asks = [Ask(self.titles[t], genres[t], tuple((self.titles[r], shared_genres(genres[t], [genres[r]], None))
                                                           for r in self.evidence_rank(shown, t, EXPLAIN_CANDIDATES)))
                    for t in targets]
            texts = explainer.generate(profile.input_ids, asks)
        unique = list(dict.fromkeys(rows))
        vocabulary = self._genre_vocabulary
        quotable = [self.titles[r] for r in unique]
        reasons = []
        for target, text in zip(targets, texts):
            checked = text is not None and check_reason(text, quotable, (self.titles[target], *vocabulary)) is None
            cites = ground(text, self._title_matcher, unique) if checked else None
            if cites is not None and genre_claims(text, vocabulary) <= set(
                    shared_genres(genres[target], [genres[c] for c in cites], limit=None)):
                reasons.append(Reason(text, tuple(self.item_ids[r] for r in cites), "llm"))
                continue
            best = self.evidence_rank(unique, target, 2)
            reasons.append(Reason(template_reason([self.titles[r] for r in best],
                                                  shared_genres(genres[target], [genres[r] for r in best])),
                                  tuple(self.item_ids[r] for r in best), "template"))
        return reasons

    def _reason_writer(self):
        """The :class:`rerank.reasons.Explainer` that writes reasons: the run's fine-tuned reasons adapter (unless
        :meth:`use_reasons_adapter` turned it off), else the reranker's text LM without its adapter."""
        from rerank.reasons import Explainer

        if self._use_reasons_adapter and self._reasons_lm is None:
            self._reasons_lm = self._load_reasons_lm() or False
        rr, adapter = (self._reasons_lm, True) if self._use_reasons_adapter and self._reasons_lm else \
            (self._text_reranker, False)
        if self._explainer is None or self._explainer.rr is not rr:
            self._explainer = Explainer(rr, adapter=adapter)  # reads the tokenizer's vocabulary once
        return self._explainer

    def _load_reasons_lm(self):
        """The text LM with the run's reasons adapter (``train-reasons``), or None when the run has none."""
        from rerank.llm import read_adapter
        from rerank.reasons import REASONS

        found = read_adapter(self.run_dir, REASONS)
        if found is None:
            return None
        weights, record, state = found
        rr = self.build_reranker(adapter=False, cfg=self._text_config())
        if record.get("model") != rr.model_ref:
            raise CheckpointError(f"{weights}: reasons adapter for model {record.get('model')!r}, not "
                                  f"{rr.model_ref!r}; rerun train-reasons")
        rr.add_lora(record["lora"])
        rr.load_adapter_state(state)
        rr.eval()
        rr.trained = record
        logger.info("reasons: fine-tuned adapter from %s", weights)
        return rr

    def use_reasons_adapter(self, on: bool = True) -> bool:
        """Write reasons with the run's fine-tuned reasons adapter (``on``, the default where the run has one) or
        with the zero-shot LM; returns whether the adapter is in use."""
        self._use_reasons_adapter = bool(on)
        return self._reason_writer().adapter

    @property
    def cooccurrence(self):
        """Reasons' evidence: :class:`rerank.reasons.CoOccurrence` over the served users' histories (built on
        first use; assign another, e.g. one over held-out-free histories, to evaluate reasons)."""
        if self._cooccurrence is None:
            from rerank.reasons import CoOccurrence

            known = [[self.index_items.row(i) for i in h if i in self.index_items] for h in self.histories.values()]
            self._cooccurrence = CoOccurrence(known, len(self.item_ids))
        return self._cooccurrence

    @cooccurrence.setter
    def cooccurrence(self, value) -> None:
        self._cooccurrence = value

    @property
    def genres(self) -> list[tuple[str, ...]]:
        """Each index row's genres, lower case (all empty when the index has no ``genres`` column)."""
        if self._genres is None:
            from rerank.reasons import genre_list

            cells = self.items["genres"].to_list() if "genres" in self.items.columns else [None] * len(self.item_ids)
            self._genres = [genre_list(g if isinstance(g, str) else None) for g in cells]
        return self._genres

    @property
    def _genre_vocabulary(self) -> list[str]:
        return sorted({g for gs in self.genres for g in gs})

    def evidence_rank(self, rows: list[int], target: int, n: int, cooccurrence=None,
                      exclude_user: int | None = None) -> list[int]:
        """The ``n`` of ``rows`` with the most evidence for ``target``: co-occurrence strength (``cooccurrence``,
        default :attr:`cooccurrence`; ``exclude_user`` not counted), then item-embedding cosine, then the most
        recent (``rerank.reasons.evidence_order``)."""
        from rerank.reasons import evidence_order

        co = self.cooccurrence if cooccurrence is None else cooccurrence
        order = evidence_order(co.strength(target, rows, exclude_user), self.retriever.similarities(rows, target))
        return [rows[i] for i in order[:n]]

    @property
    def _text_reranker(self):
        """The text LM that writes reasons: the reranker's own, or (``rerank.mode: sequence``, which has no text
        LM) a zero-shot listwise one, built once."""
        if self.config.rerank.mode != "sequence":
            return self.reranker
        if self._text_lm is None:
            self._text_lm = self.build_reranker(adapter=False, cfg=self._text_config())
        return self._text_lm

    def _text_config(self):
        """``rerank`` settings for a text LM (listwise: the sequence mode has no text prompt)."""
        from configs import LETTER_LABELS

        cfg = self.config.rerank
        if cfg.mode != "sequence":
            return cfg
        return dataclasses.replace(cfg, mode="listwise", candidates=min(cfg.candidates, LETTER_LABELS))

    @property
    def _title_matcher(self):
        from rerank.reasons import TitleMatcher

        if self._matcher is None:
            self._matcher = TitleMatcher(self.titles)
        return self._matcher
