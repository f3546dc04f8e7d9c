"""An ``allow`` list that the history (or the item itself, for ``similar``) empties: the result says why in
``Results.hint``, the library logs a WARNING, and the CLI prints the hint; on the tiny trained run."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import cli
from index.recommender import Recommender


def _unseen(rec: Recommender, user, n: int) -> list:
    seen = set(rec.history_of(user))
    return [i for i in rec.item_ids if i not in seen][:n]


def _warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "index.recommender" and r.levelno == logging.WARNING]


def test_allow_of_seen_items_only_says_why_it_is_empty(rec: Recommender, user, caplog) -> None:
    seen = rec.history_of(user)[:4]
    with caplog.at_level(logging.WARNING, logger="index.recommender"):
        out = rec.recommend(user_id=user, k=10, rerank=False, allow=seen)
    assert list(out) == []
    assert out.hint == ("all 4 allowed item(s) that pass the filters are already seen (in the history or exclude), "
                        "and those are never recommended")
    assert _warnings(caplog) == [f"allow: {out.hint}"] and "hint=" in repr(out)
    # exclude counts as seen too; a generator is read once like a list.
    fresh = _unseen(rec, user, 1)
    out = rec.recommend(user_id=user, k=3, rerank=False, allow=(i for i in seen + fresh), exclude=fresh)
    assert list(out) == [] and out.hint.startswith("all 5 allowed item(s)")


def test_allow_partly_seen_hint_counts_what_was_left_out(rec: Recommender, user, caplog) -> None:
    seen, fresh = rec.history_of(user)[:2], _unseen(rec, user, 1)
    out = rec.recommend(user_id=user, k=5, rerank=False, allow=seen + fresh)
    assert [r.item_id for r in out] == fresh
    assert out.hint == "2 of the 3 allowed items that pass the filters are already seen (in the history or exclude) " \
                       "and were left out"
    # Denied or filtered-out allowed items do not count as passing: the seen ones are then all there is.
    denied = rec.recommend(user_id=user, k=5, rerank=False, allow=seen + fresh, deny=fresh)
    assert list(denied) == [] and denied.hint.startswith("all 2 allowed item(s)")


def test_no_hint_when_the_history_is_not_why(rec: Recommender, user, caplog) -> None:
    fresh = _unseen(rec, user, 3)
    with caplog.at_level(logging.WARNING, logger="index.recommender"):
        short = rec.recommend(user_id=user, k=10, rerank=False, allow=fresh)  # short, but nothing seen
        full = rec.recommend(user_id=user, k=2, rerank=False, allow=fresh + rec.history_of(user)[:2])
        plain = rec.recommend(user_id=user, k=5, rerank=False)
    assert len(short) == 3 and short.hint is None
    assert len(full) == 2 and full.hint is None and plain.hint is None
    assert _warnings(caplog) == []


def test_batch_hints_per_query_and_one_warning(rec: Recommender, caplog) -> None:
    users = sorted(rec.histories)[:3]
    common = rec.history_of(users[0])[:3]
    with caplog.at_level(logging.WARNING, logger="index.recommender"):
        out = rec.recommend_batch(user_ids=users, k=5, rerank=False, allow=common)
    for u, res in zip(users, out):
        left_out = set(common) & set(rec.history_of(u))
        assert (res.hint is not None) == bool(left_out)
        assert {r.item_id for r in res} == set(common) - left_out
    assert len(_warnings(caplog)) == 1 and "see each Results.hint" in _warnings(caplog)[0]


def test_similar_allowing_only_the_item_itself(rec: Recommender) -> None:
    item = rec.item_ids[0]
    out = rec.similar(item, k=3, allow=[item])
    assert list(out) == [] and out.hint.startswith("all 1 allowed item(s) that pass the filters are the item itself")
    assert rec.similar(item, k=3).hint is None


def test_cli_query_prints_the_hint(tiny_run: Path, rec: Recommender, user, capsys) -> None:
    seen = ",".join(str(i) for i in rec.history_of(user)[:4])
    base = ["query", "--run", str(tiny_run), "--user", str(user), "--allow", seen, "--rerank", "off",
            "--device", "cpu"]
    assert cli.main(base) == 0
    out = capsys.readouterr().out.splitlines()
    hints = [line for line in out if line.startswith("  hint: ")]
    assert hints == ["  hint: all 4 allowed item(s) that pass the filters are already seen (in the history or "
                     "exclude), and those are never recommended"]
    assert cli.main([*base, "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["items"] == [] and data["hint"].startswith("all 4 allowed item(s)")
    assert cli.main(["query", "--run", str(tiny_run), "--user", str(user), "--rerank", "off", "--device", "cpu",
                     "--json"]) == 0
    assert "hint" not in json.loads(capsys.readouterr().out)
