"""Iterative k-core and chronological leave-one-out (train/split.py)."""

from __future__ import annotations

from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
import polars as pl
import pytest

from data.importers import prepare_movielens_100k, prepare_movielens_latest
from data.protocol import Split, k_core, leave_one_out, popularity_metrics


def _pairs(df: pl.DataFrame) -> set[tuple]:
    return set(df.select("user_id", "item_id").iter_rows())


def test_k_core_is_iterative() -> None:
    # k = 2. Item X has one rating -> dropped; then u1 keeps only B -> dropped; then B keeps only u2 -> dropped;
    # then u2 keeps only C -> dropped. C still has u3, u4, so the cascade stops there.
    rows = [("u1", "X"), ("u1", "B"), ("u2", "B"), ("u2", "C"), ("u3", "C"), ("u3", "D"), ("u4", "C"), ("u4", "D")]
    df = pl.DataFrame({"user_id": [u for u, _ in rows], "item_id": [i for _, i in rows],
                       "timestamp": list(range(len(rows)))})
    out = k_core(df, 2)
    assert _pairs(out) == {("u3", "C"), ("u3", "D"), ("u4", "C"), ("u4", "D")}
    assert out.columns == ["user_id", "item_id", "timestamp"]
    assert sorted(out["timestamp"].to_list()) == [4, 5, 6, 7]  # rows survive untouched


def test_k_core_cascade_can_empty_the_table() -> None:
    df = pl.DataFrame({"user_id": [1, 1, 2, 2, 3, 3], "item_id": [10, 11, 10, 12, 12, 13],
                       "timestamp": [0] * 6})
    # 11 and 13 have one rating each -> dropped; users 1 and 3 then have one item -> dropped; then 10 and 12
    # have one rating each (user 2) -> dropped; then user 2 has none. Nothing survives.
    assert k_core(df, 2).height == 0
    assert _pairs(k_core(df, 1)) == _pairs(df)


def test_leave_one_out_orders_by_timestamp_then_item() -> None:
    # user 7's history, deliberately shuffled, with timestamp ties broken by item_id
    rows = [
        (7, 30, 10), (7, 40, 5), (7, 50, 20), (7, 20, 10), (7, 10, 20),
        (3, 20, 1), (3, 10, 1), (3, 30, 0),
    ]
    df = pl.DataFrame({"user_id": [r[0] for r in rows], "item_id": [r[1] for r in rows],
                       "timestamp": [r[2] for r in rows]})
    split = leave_one_out(df, min_count=1)
    assert split.user_ids == [3, 7]
    assert split.item_ids == [10, 20, 30, 40, 50]
    assert (split.num_users, split.num_items, split.num_interactions()) == (2, 5, 8)

    def ids(dense) -> list[int]:
        return [split.item_ids[j] for j in dense]

    # user 7 sorted by (timestamp, item_id): (5,40) (10,20) (10,30) (20,10) (20,50)
    u7 = split.user_ids.index(7)
    assert ids(split.sequences[u7]) == [40, 20, 30, 10, 50]
    assert ids(split.train_seq(u7)) == [40, 20, 30]
    assert split.item_ids[split.valid_target(u7)] == 10
    assert split.item_ids[split.test_target(u7)] == 50
    # user 3 sorted: (0,30) (1,10) (1,20)
    u3 = split.user_ids.index(3)
    assert ids(split.train_seq(u3)) == [30]
    assert (split.item_ids[split.valid_target(u3)], split.item_ids[split.test_target(u3)]) == (10, 20)


def test_leave_one_out_string_ids() -> None:
    df = pl.DataFrame({"user_id": ["b", "b", "b", "a", "a", "a"],
                       "item_id": ["i9", "i10", "i2", "i2", "i9", "i10"],
                       "timestamp": [1, 1, 1, 3, 2, 1]})
    split = leave_one_out(df, min_count=1)
    assert split.user_ids == ["a", "b"]
    assert split.item_ids == ["i10", "i2", "i9"]  # lexicographic, as strings
    assert [[split.item_ids[j] for j in s] for s in split.sequences] == [["i10", "i9", "i2"], ["i10", "i2", "i9"]]


def test_leave_one_out_errors() -> None:
    df = pl.DataFrame({"user_id": [1, 1, 2, 2, 2], "item_id": [1, 2, 1, 2, 3], "timestamp": [1, 2, 3, 4, 5]})
    with pytest.raises(ValueError, match="user 1 has fewer than 3 interactions"):
        leave_one_out(df, min_count=1)
    with pytest.raises(ValueError, match="no interactions survive the 5-core filter"):
        leave_one_out(df, min_count=5)


def _reference_split(rows: list[tuple[int, int, int]], k: int) -> dict[int, list[int]]:
    """Plain-Python iterative k-core + (timestamp, item_id) ordering, independent of polars."""
    while True:
        before = len(rows)
        items = Counter(i for _, i, _ in rows)
        rows = [r for r in rows if items[r[1]] >= k]
        users = Counter(u for u, _, _ in rows)
        rows = [r for r in rows if users[r[0]] >= k]
        if len(rows) == before:
            break
    seqs: dict[int, list[tuple[int, int]]] = defaultdict(list)
    for u, i, t in rows:
        seqs[u].append((t, i))
    return {u: [i for _, i in sorted(s)] for u, s in seqs.items()}


def test_movielens_100k_protocol(ml100k_dir: Path, tmp_path: Path) -> None:
    catalog = prepare_movielens_100k(ml100k_dir, tmp_path / "ml100k")
    split = leave_one_out(catalog.interactions, min_count=5)
    assert (split.num_users, split.num_items) == (943, 1349)

    reference = _reference_split(catalog.interactions.select("user_id", "item_id", "timestamp").rows(), 5)
    assert sorted(reference) == split.user_ids
    assert split.num_interactions() == sum(len(s) for s in reference.values())
    for u, user_id in enumerate(split.user_ids):
        assert [split.item_ids[j] for j in split.sequences[u]] == reference[user_id], user_id


def test_movielens_latest_small_protocol(shared_datasets: Path, tmp_path: Path) -> None:
    catalog = prepare_movielens_latest(shared_datasets / "movielens-latest-small", tmp_path / "latest")
    split = leave_one_out(catalog.interactions, min_count=5)
    assert (split.num_users, split.num_items, split.num_interactions()) == (610, 3650, 90274)
    assert all(len(s) >= 5 for s in split.sequences)


def test_tie_break_input_order_keeps_row_order() -> None:
    # u1's last two events share a timestamp; rows put item 9 before item 3.
    df = pl.DataFrame({"user_id": [1, 1, 1, 1], "item_id": [5, 9, 3, 7], "timestamp": [10, 30, 30, 20]})
    by_id = leave_one_out(df, min_count=1, tie_break="item_id")
    by_row = leave_one_out(df, min_count=1, tie_break="input_order")
    as_ids = lambda s: [s.item_ids[j] for j in s.sequences[0]]  # noqa: E731
    assert as_ids(by_id) == [5, 7, 3, 9]
    assert as_ids(by_row) == [5, 7, 9, 3]
    with pytest.raises(ValueError, match="tie_break"):
        leave_one_out(df, min_count=1, tie_break="random")


def test_movielens_100k_pop_matches_published_anchor(ml100k_dir: Path, tmp_path: Path) -> None:
    """Most-popular-unseen under the importer's tie-break lands near RecBole's published Pop (Recall@10 0.0827)."""
    catalog = prepare_movielens_100k(ml100k_dir, tmp_path / "ml100k")
    assert catalog.meta["tie_break"] == "input_order"
    results = {t: popularity_metrics(leave_one_out(catalog.interactions, 5, t), "test")["recall@10"]
               for t in ("input_order", "item_id")}
    assert abs(results["input_order"] - 0.0827) < 0.01, results
    assert results["item_id"] < 0.06, results  # the other tie-break moves the test targets to rarer items


def test_popularity_ranks_by_count_then_index_and_excludes_history() -> None:
    """Pop on a hand-made split: counts before the target, ties to the lower index, the history excluded."""
    # items 0..4; each user's last two items are the validation and test targets
    split = Split(user_ids=[0, 1, 2], item_ids=list(range(5)),
                  sequences=[np.array(s) for s in ([2, 2, 1, 3, 0], [2, 1, 4, 3], [1, 0, 4, 1])])
    # training items: [2, 2, 1], [2, 1], [1, 0] -> counts 0:1, 1:3, 2:3, 3:0, 4:0 -> order 1, 2, 0, 3, 4
    # user 0 valid target 3, history [2, 2, 1] excluded -> ranking 0, 3, 4: rank 1
    # user 1 valid target 4, history [2, 1] -> 0, 3, 4: rank 2
    # user 2 valid target 4, history [1, 0] -> 2, 3, 4: rank 2
    valid = popularity_metrics(split, "valid")
    assert valid["mrr@5"] == pytest.approx((1 / 2 + 1 / 3 + 1 / 3) / 3)
    assert valid["recall@5"] == 1.0 and valid["users"] == 3
    # test counts the validation items too: 0:1, 1:3, 2:3, 3:1, 4:2 -> order 1, 2, 4, 0, 3
    # user 0 target 0, history [2, 2, 1, 3] -> 4, 0: rank 1; user 1 target 3, history [2, 1, 4] -> 0, 3: rank 1
    # user 2 target 1, seen before (a re-watch is still ranked), history minus target [0, 4] -> 1: rank 0
    test = popularity_metrics(split, "test")
    assert test["mrr@5"] == pytest.approx((1 / 2 + 1 / 2 + 1) / 3)
