"""A reason the LM writes is served as its own only when it passes rerank.reasons.check_reason: exact history
titles, nothing else quoted, one short finished sentence of plain words. Word salad (what the tiny run's random
LM writes) and a title the tokenizer lower-cased fall back to the template."""

from __future__ import annotations

import re
from pathlib import Path

import polars as pl
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from rerank.pipeline import EXPLAIN_CANDIDATES, Pipeline
from rerank.reason_words import COMMON_WORDS
from rerank.reasons import (
    MAX_REASON_WORDS,
    OPENING,
    Ask,
    Explainer,
    check_reason,
    template_reason,
)

HISTORY = ["Titanic (1997)", "Heat (1995)", "Godfather, The (1972)", "One Flew Over the Cuckoo's Nest (1975)"]
GENRES = ("action", "crime", "drama", "sci-fi", "film-noir", "children's")


# -- the checks, one by one ------------------------------------------------------------------------------------


def test_word_salad_is_refused() -> None:
    # Verbatim from the tiny run's random LM (its decoded word pieces), after an exact title.
    salad = ('Because you watched "Titanic (1997)" shittywes remarkableali afghanrre good earnedertoge threaded '
             'recreated possibilityhu armored lillian standing glint [unused145] hard tour.')
    assert check_reason(salad, HISTORY) is not None
    # Each kind of stray piece alone is enough.
    for bad, why in [("shittywes", "not a word"), ("good earnedertoge", "not a word"),
                     ("[unused145]", "characters other than"), ("cam 425 volga", "characters other than"),
                     ("mausoleumvr plaid", "not a word"), ("ج porto", "characters other than"),
                     ("a GREAT film", "not lowercase"), ("a gReat film", "not lowercase")]:
        problem = check_reason(f'Because you watched "Heat (1995)": {bad}.', HISTORY)
        assert problem is not None and why in problem, (bad, problem)


def test_titles_must_be_the_catalogs_exact_strings() -> None:
    for quoted in ["titanic ( 1997 )", "titanic (1997)", "Titanic  (1997)", "Titanic", "Titanic (1997) ",
                   "Blade Runner (1982)"]:
        problem = check_reason(f'Because you watched "{quoted}".', HISTORY)
        assert problem is not None and "not exactly a title of the history" in problem, quoted
    assert check_reason('Because you watched "Titanic (1997)".', HISTORY) is None


def test_no_other_quoted_text_and_one_short_finished_sentence() -> None:
    ok = 'Because you watched "Heat (1995)"'
    refused = {
        f'{ok} and \u201cBlade Runner\u201d.': "quotes other than",
        f'{ok} and "Heat (1995)".': "twice",
        f'{ok} and "unforgettable".': "not exactly a title",
        f'{ok} and "Titanic': "not a finished sentence",
        f'{ok} and "Titanic (1997)" and…': "not a finished sentence",  # cut at rerank.explain_tokens
        f'{ok}, ' + "a very good film and " * 8 + "more.": f"more than {MAX_REASON_WORDS}",
        'You will like "Heat (1995)".': "does not start with",
    }
    for text, why in refused.items():
        problem = check_reason(text, HISTORY)
        assert problem is not None and why in problem, (text, problem)


def test_well_formed_reasons_pass() -> None:
    assert check_reason('Because you watched "Heat (1995)" and "Godfather, The (1972)": another crime pick.',
                        HISTORY, GENRES) is None
    assert check_reason('Because you watched "Heat (1995)", you will probably enjoy this tense crime thriller too.',
                        HISTORY, GENRES) is None
    # Words of the recommendation's title may be used, as spelt there; the history's titles' words too.
    assert check_reason('Because you watched "Titanic (1997)", another Cameron epic like Titanic.', HISTORY,
                        ("Cameron: The Abyss (1989)",)) is None
    assert check_reason('Because you watched "Titanic (1997)", another Cameron epic.', HISTORY) is not None


@pytest.fixture(scope="module")
def catalog_titles(ml100k_dir: Path) -> list[str]:
    """Every ML-100K title, as the catalog spells it."""
    items = pl.read_csv(ml100k_dir / "u.item", separator="|", has_header=False, encoding="latin1", quote_char=None,
                        infer_schema=False)
    return [t for t in items["column_1"].to_list() if t and '"' not in t]


@settings(max_examples=60, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_the_template_sentence_always_passes(catalog_titles: list[str], data) -> None:
    """What train-reasons teaches (the template's sentence) is never refused, for any real titles and genres."""
    titles = data.draw(st.lists(st.sampled_from(catalog_titles), min_size=1, max_size=2, unique=True))
    genres = data.draw(st.lists(st.sampled_from(GENRES), max_size=2, unique=True))
    history = titles + data.draw(st.lists(st.sampled_from(catalog_titles), max_size=5))
    assert check_reason(template_reason(titles, genres), history, GENRES) is None


# -- the tiny run: a random LM --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def rec(tiny_run: Path) -> Pipeline:
    return Pipeline.load(tiny_run, device="cpu")


@settings(max_examples=40, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_random_word_pieces_are_refused(rec: Pipeline, data) -> None:
    """Any 5 to 30 tokens of the tiny LM's vocabulary after an exact title: refused (random text is not plain
    English)."""
    tok = rec.reranker.tokenizer
    special = set(tok.all_special_ids)
    ids = data.draw(st.lists(st.integers(0, len(tok) - 1).filter(lambda i: i not in special), min_size=5,
                             max_size=30))
    title = data.draw(st.sampled_from(rec.titles))
    text = f'{OPENING}{title}" {tok.decode(ids, skip_special_tokens=True)}.'
    assert check_reason(text, [title]) is not None, text


def test_plain_words_are_few_and_clean() -> None:
    assert 500 < len(COMMON_WORDS) < 2000
    assert all(re.fullmatch(r"[a-z]+(?:['-][a-z]+)*", w) for w in COMMON_WORDS)


def test_tiny_runs_random_lm_falls_back_to_the_template(rec: Pipeline) -> None:
    """explain=True on the tiny run: the random LM's texts fail the checks, so every reason is the template."""
    user = sorted(rec.histories)[0]
    history = rec.history_of(user)
    recs = rec.recommend(user_id=user, k=4, rerank=False)
    rows = rec._rows(history)
    explainer = rec._reason_writer()
    profile = explainer.rr.history.build(rows)
    shown = list(dict.fromkeys(profile.items))
    asks = [Ask(rec.titles[t], (), tuple((rec.titles[r], ()) for r in rec.evidence_rank(shown, t, EXPLAIN_CANDIDATES)))
            for t in (rec.index_items.row(r.item_id) for r in recs)]
    quotable = [rec.titles[r] for r in dict.fromkeys(rows)]
    written = explainer.generate(profile.input_ids, asks)
    assert all(check_reason(text, quotable) is not None for text in written), written
    served = rec.recommend(user_id=user, k=4, rerank=False, explain=True)
    assert [r.reason_source for r in served] == ["template"] * 4
    assert all(r.reason == template_reason([rec.titles[rec.index_items.row(c)] for c in r.reason_cites])
               for r in served)


def test_explain_serves_only_checked_llm_reasons(rec: Pipeline, monkeypatch) -> None:
    """Through Recommender.explain: an exact, plain reason is the LM's; the same with the title lower-cased, or
    with a word of salad, is replaced by the template."""
    user = sorted(rec.histories)[0]
    history = rec.history_of(user)
    seen = rec.titles[rec._rows(history)[-1]]
    written = [f'Because you watched "{seen}", a film you will like.',
               f'Because you watched "{seen.lower()}", a film you will like.',
               f'Because you watched "{seen}", a film shittywes like.']
    monkeypatch.setattr(Explainer, "generate", lambda self, profile, asks: written[: len(asks)])
    target = rec.recommend(user_id=user, k=1, rerank=False)[0]
    reasons = rec.explain(user, [target] * 3)
    assert [r.source for r in reasons] == ["llm", "template", "template"]
    assert reasons[0].text == written[0]
    assert all(r.text.startswith(OPENING) and r.text != w for r, w in zip(reasons[1:], written[1:]))
