"""Reranking through the Pipeline only reorders what it was given (both modes), and personalised reasons
name only items of the user's history (the LM is constrained, checked, and replaced by a template if need be)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest

import cli
from errors import ConfigError, QueryError
from rerank.pipeline import EXPLAIN_CANDIDATES, Pipeline
from rerank.reasons import Ask, Explainer, TitleMatcher, ground, normalise_title, template_reason


@pytest.mark.parametrize("mode", ["pointwise", "listwise"])
def test_rerank_only_reorders_what_it_was_given(rec: Pipeline, user, mode: str) -> None:
    rec.configure_rerank(mode=mode, permutations=2)
    depth = rec.config.rerank.candidates  # 10 in the tiny setup
    history = rec.history_of(user)
    retrieved = list(rec.recommend(user_id=user, k=depth + 5, rerank=False))
    reranked = rec.rerank(history, retrieved)
    assert len(reranked) == len(retrieved)
    assert {r.item_id for r in reranked[:depth]} == {r.item_id for r in retrieved[:depth]}
    assert reranked[depth:] == retrieved[depth:]  # beyond the depth: retrieval order, untouched
    assert all(r.rerank_score is not None for r in reranked[:depth])
    assert [r.score for r in reranked[:depth]] == sorted((r.score for r in reranked[:depth]), reverse=True)
    assert [r.item_id for r in reranked] != [r.item_id for r in retrieved]  # it did reorder
    # Batched across users, each list comes out as it would alone; k cuts the head.
    other = next(u for u in rec.histories if u != user)
    other_list = list(rec.recommend(user_id=other, k=depth, rerank=False))
    batch = rec.rerank_batch([history, rec.history_of(other)], [retrieved, other_list], k=4)
    assert [r.item_id for r in batch[0]] == [r.item_id for r in reranked[:4]]
    assert [r.item_id for r in batch[1]] == [r.item_id for r in rec.rerank(rec.history_of(other), other_list, 4)]
    rec.configure_rerank(mode="pointwise", permutations=1)


def test_configure_rerank_is_checked(rec: Pipeline) -> None:
    with pytest.raises(ConfigError, match="rerank.mode: must be one of"):
        rec.configure_rerank(mode="generative")
    with pytest.raises(ConfigError, match="unknown key"):
        rec.configure_rerank(depth=5)
    assert rec.config.rerank.mode == "pointwise"


# -- reasons -------------------------------------------------------------------------------------------------


def test_title_matching() -> None:
    assert normalise_title("Godfather, The (1972)") == normalise_title("The Godfather") == "godfather"
    assert normalise_title("City of Lost Children, The (Cité des enfants perdus, La) (1995)") == \
        "city of lost children"
    matcher = TitleMatcher(["Star Wars (1977)", "Heat (1995)", "Godfather, The (1972)", "Fargo (1996)"])
    history = [0, 1]
    assert ground('Because you watched "Star Wars" and "Heat (1995)", a classic.', matcher, history) == [0, 1]
    assert ground('Because you watched "Star Wars", like The Godfather.', matcher, history) is None  # unquoted other
    assert ground('Because you watched "Fargo (1996)".', matcher, history) is None  # a catalog item not seen
    assert ground('Because you watched "Blade Runner".', matcher, history) is None  # an invented title
    assert ground("Because you like films.", matcher, history) is None  # cites nothing
    assert ground('Because you watched "Heat", in the heat of summer.', matcher, history) == [1]


def test_reasons_cite_only_the_history(rec: Pipeline, user) -> None:
    recs = rec.recommend(user_id=user, k=4, rerank=False)
    history = rec.history_of(user)
    reasons = rec.explain(user, recs)
    assert len(reasons) == 4
    rows = rec._rows(history)
    for reason in reasons:
        assert reason.cites and set(reason.cites) <= set(history)
        assert reason.source in ("llm", "template") and str(reason).startswith("Because you watched")
        quoted, unquoted = rec._title_matcher.mentions(str(reason))
        for name in quoted + unquoted:  # every title it names is a history item's
            assert set(rec._title_matcher.by_norm[name]) & set(rows)
    # A written reason quotes only history items with evidence for the recommendation: one of the
    # EXPLAIN_CANDIDATES history items (of those its prompt shows) that rank first by co-occurrence, then by
    # item-embedding similarity.
    shown = list(dict.fromkeys(rec.reranker.history.build(rows).items))
    # (The tiny run's random LM writes none that passes rerank.reasons.check_reason: tests/rerank/test_reason_checks.py)
    written = [(r, x) for r, x in zip(recs, reasons) if x.source == "llm"]
    for r, x in written:
        near = rec.evidence_rank(shown, rec.index_items.row(r.item_id), EXPLAIN_CANDIDATES)
        assert {rec.index_items.row(c) for c in x.cites} <= set(near), (x.text, [rec.titles[n] for n in near])
        assert x.text.endswith((".", "!", "?", "…"))
        assert all(q == q.strip() for q in re.findall(r'"([^"]*)"', x.text)), x.text
    # The same for a new user's history, and the templates alone.
    assert len(rec.explain(history[:3], [r.item_id for r in recs[:2]])) == 2
    templates = rec.explain(user, recs, llm=False)
    assert all(r.source == "template" and len(r.cites) == 2 for r in templates)


def test_constrained_generation_quotes_history_titles(rec: Pipeline, user) -> None:
    """Whatever the LM writes inside quotes is a whole title of the history it was shown."""
    rr = rec.reranker
    profile = rr.history.build(rec._rows(rec.history_of(user)))
    shown = [rec.titles[r] for r in profile.items]
    related = tuple((t, ()) for t in shown)
    texts = Explainer(rr).generate(profile.input_ids, [Ask(rec.titles[i], (), related) for i in range(3)])
    allowed = {normalise_title(rr.tokenizer.decode(rr._encode(t))) for t in shown}
    assert len(texts) == 3
    for text in texts:
        quoted, _ = TitleMatcher([]).mentions(text)
        assert quoted and set(quoted) <= allowed, text


def test_template_cites_the_history_items_with_the_most_evidence(rec: Pipeline, user, monkeypatch) -> None:
    """A reason naming an unseen item, citing nothing, or claiming a genre the data does not back is replaced by
    the template over the two history items with the most evidence: co-occurrence first, then similarity."""
    history = rec.history_of(user)
    rows = list(dict.fromkeys(rec._rows(history)))
    target = rec.recommend(user_id=user, k=1, rerank=False)[0]
    t = rec.index_items.row(target.item_id)
    v = np.stack([rec.index.reconstruct(int(rec.faiss_ids[r])) for r in rows])
    tv = rec.index.reconstruct(int(rec.faiss_ids[t]))
    sims = (v / np.linalg.norm(v, axis=1, keepdims=True)) @ (tv / np.linalg.norm(tv))
    strength = rec.cooccurrence.strength(t, rows)
    order = sorted(range(len(rows)), key=lambda i: (-strength[i], -sims[i], -i))
    want = tuple(rec.item_ids[rows[i]] for i in order[:2])
    assert rec.evidence_rank(rows, t, 2) == [rows[i] for i in order[:2]]
    # Genres: the recommendation is a comedy and drama; the first history item a drama; nothing else has any.
    genres = [()] * len(rec.item_ids)
    genres[t], genres[rows[0]] = ("comedy", "drama"), ("drama",)
    monkeypatch.setattr(rec, "_genres", genres)
    seen_title, unseen = rec.titles[rows[0]], next(i for i in rec.item_ids if i not in history)
    unseen_title = rec.titles[rec.index_items.row(unseen)]
    written = [f'Because you watched "{seen_title}" and "{unseen_title}".',  # names an unseen item
               f'Because you watched "{seen_title}", a classic.',  # grounded
               "Because you like films.",  # cites nothing
               f'Because you watched "{seen_title}": another drama pick.',  # a genre both have
               f'Because you watched "{seen_title}": another comedy pick.']  # the cited item is no comedy
    monkeypatch.setattr(Explainer, "generate", lambda self, profile, asks: written[: len(asks)])
    reasons = rec.explain(user, [target] * 5)
    assert [r.source for r in reasons] == ["template", "llm", "template", "llm", "template"]
    assert reasons[1].text == written[1] and reasons[1].cites == (rec.item_ids[rows[0]],)
    assert reasons[3].text == written[3]
    assert reasons[0].cites == reasons[2].cites == reasons[4].cites == want
    assert unseen_title not in reasons[0].text
    shared = ("drama",) if rec.item_ids[rows[0]] in want else ()
    assert reasons[0].text == template_reason([rec.titles[rec.index_items.row(i)] for i in want], shared)


def test_recommend_with_explain(rec: Pipeline, user) -> None:
    """explain=True on recommend and recommend_batch attaches the reasons :meth:`explain` gives, in order."""
    recs = rec.recommend(user_id=user, k=3, rerank=False, explain=True)
    plain = rec.recommend(user_id=user, k=3, rerank=False)
    assert [r.item_id for r in recs] == [r.item_id for r in plain]
    assert all(r.reason is None and r.reason_cites == () for r in plain)
    reasons = rec.explain(user, plain)
    assert [r.reason for r in recs] == [str(x) for x in reasons]
    assert [r.reason_cites for r in recs] == [tuple(x.cites) for x in reasons]
    assert all(set(r.reason_cites) <= set(rec.history_of(user)) for r in recs)
    history = rec.history_of(user)[:4]
    batch = rec.recommend_batch(user_ids=[user], k=3, rerank=False, explain=True)
    assert [r.reason for r in batch[0]] == [r.reason for r in recs]
    new_user = rec.recommend(history=history, k=2, rerank=False, explain=True)
    assert all(r.reason_source in ("llm", "template") and set(r.reason_cites) <= set(history) for r in new_user)


def test_explain_input_errors(rec: Pipeline, user) -> None:
    with pytest.raises(QueryError, match="unknown user_id"):
        rec.explain("no-such-user", [1])
    with pytest.raises(QueryError, match="unknown item_id .* in recommendations"):
        rec.explain(user, ["no-such-item"])
    with pytest.raises(QueryError, match="empty history"):
        rec.explain([], [rec.item_ids[0]])
    assert rec.explain(user, []) == []


def test_cli_query_explain(tiny_run: Path, rec: Pipeline, user, capsys) -> None:
    argv = ["query", "--run", str(tiny_run), "--user", str(user), "-k", "2", "--rerank", "off", "--explain",
            "--device", "cpu"]
    assert cli.main([*argv, "--json"]) == 0
    items = json.loads(capsys.readouterr().out)["items"]
    assert len(items) == 2 and all(i["reason"].startswith("Because you watched") for i in items)
    assert all(i["reason_source"] in ("llm", "template") for i in items)
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    assert out.count("Because you watched") == 2


def test_the_recommender_alone_retrieves_and_names_the_pipeline(tiny_run: Path, user) -> None:
    """index/ holds retrieval only: a bare Recommender answers rerank=False as the pipeline's retrieval does, and
    asking it for an LLM stage is one clear error that names the pipeline."""
    from index.recommender import Recommender

    bare = Recommender.load(tiny_run, device="cpu")
    pipeline = Pipeline(bare)
    plain = bare.recommend(user_id=user, k=5)
    assert [r.item_id for r in plain] == [r.item_id for r in pipeline.recommend(user_id=user, k=5, rerank=False)]
    assert [r.item_id for r in bare.recommend(user_id=user, k=5, rerank=False, explain=False)] == \
        [r.item_id for r in plain]
    for stage in ("rerank", "explain"):
        with pytest.raises(QueryError, match=rf"^{stage}=True: a Recommender only retrieves; the LLM stages are "
                                             r"rerank\.Pipeline's"):
            bare.recommend(user_id=user, k=5, **{stage: True})
    reranked = pipeline.recommend(user_id=user, k=5, rerank=True)
    assert all(r.rerank_score is not None for r in reranked)
    assert reranked.version == plain.version


def test_index_never_imports_rerank_or_train() -> None:
    """The layers run one way: nothing under index/ imports rerank/ or train/ (checked on the source)."""
    import ast

    root = Path(__file__).resolve().parents[2] / "index"
    for path in sorted(root.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            for name in names:
                assert name.split(".")[0] not in {"rerank", "train", "serve"}, f"{path.name} imports {name}"
