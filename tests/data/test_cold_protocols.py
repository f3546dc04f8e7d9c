"""Cold-start protocols (data.protocol): what training may see, what is scored, and what is reported."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from configs import load_config
from data.protocol import (
    COLD_USER_ITEMS,
    Split,
    apply_protocol,
    held_out,
    popularity_metrics,
    protocol_metrics,
)
from errors import ConfigError

ITEMS = ["user.input=items", "item.image.enabled=false", "item.audio.enabled=false"]


def _split(users: int = 40, items: int = 30, length: int = 9, seed: int = 0) -> Split:
    """Random sequences over ``items`` items (ids 100, 101, ...), each of ``length`` distinct items."""
    rng = np.random.default_rng(seed)
    seqs = [rng.choice(items, size=length, replace=False) for _ in range(users)]
    return Split(user_ids=[f"u{u}" for u in range(users)], item_ids=[100 + j for j in range(items)], sequences=seqs)


def test_warm_is_the_split_itself() -> None:
    split = _split()
    assert apply_protocol(split, "warm") is split
    assert split.num_cases("test") == split.num_users and split.num_train_items == split.num_items


def test_cold_items_are_never_trained_on_and_their_users_are_scored() -> None:
    warm = _split()
    split = apply_protocol(warm, "cold-items", share=0.2, seed=3)
    n_train = split.num_train_items
    assert n_train == warm.num_items - 6  # 20% of 30
    new_ids = set(split.item_ids[n_train:])
    assert sorted(split.item_ids) == sorted(warm.item_ids)  # the same items, the new ones last
    # Each user's sequence is the same ids in the same order.
    for u in range(warm.num_users):
        assert [split.item_ids[j] for j in split.sequences[u]] == [warm.item_ids[j] for j in warm.sequences[u]]
        for through_valid in (False, True):
            assert (split.train_seq(u, through_valid) < n_train).all()  # never a new item, even in the refit
    for which, back in (("valid", 2), ("test", 1)):
        targets = [held_out(split, i, which)[0] for i in range(split.num_cases(which))]
        users = [split.case_user(i, which) for i in range(split.num_cases(which))]
        expected = [u for u in range(warm.num_users) if warm.item_ids[warm.sequences[u][-back]] in new_ids]
        assert users == expected and len(users) > 0
        assert all(t >= n_train for t in targets)
        for i, u in enumerate(users):  # the history is everything before the target, new items included
            _, history, _ = held_out(split, i, which)
            assert history.tolist() == split.sequences[u][:-back].tolist()
    # Another seed draws other items; the same seed, the same ones.
    assert apply_protocol(warm, "cold-items", 0.2, 3).item_ids == split.item_ids
    assert apply_protocol(warm, "cold-items", 0.2, 4).item_ids != split.item_ids


def test_cold_users_are_scored_from_their_first_items_only() -> None:
    warm = _split(users=50, length=7)
    split = apply_protocol(warm, "cold-users", share=0.1, seed=1)
    valid_users = {c.user for c in split.cases["valid"]}
    test_users = {c.user for c in split.cases["test"]}
    assert len(valid_users) == len(test_users) == 5 and not valid_users & test_users
    assert split.cold_users == valid_users | test_users
    for u in split.cold_users:
        assert len(split.train_seq(u)) == 0 and len(split.train_seq(u, through_valid=True)) == 0
    for which in ("valid", "test"):
        assert [c.first for c in split.cases[which]] == [k for _ in range(5) for k in COLD_USER_ITEMS]
        for i, case in enumerate(split.cases[which]):
            target, history, _ = held_out(split, i, which)
            seq = split.sequences[case.user]
            assert history.tolist() == seq[:case.first].tolist() and target == seq[case.first]
    # An item only cold users touched is new: no id vector, never a candidate in training.
    trained = np.zeros(split.num_items, dtype=bool)
    for u in range(split.num_users):
        trained[split.train_seq(u, through_valid=True)] = True
    assert trained[:split.num_train_items].all() and not trained[split.num_train_items:].any()


def test_cold_users_need_users_left_to_train_on() -> None:
    from errors import CatalogError

    with pytest.raises(CatalogError, match="leave none to train on"):
        apply_protocol(_split(users=2), "cold-users", share=0.4)


def test_pop_counts_training_interactions_only() -> None:
    """Under cold-items Pop never ranks a new item above a trained one: it has no training interactions."""
    split = apply_protocol(_split(users=200, items=40), "cold-items", share=0.1, seed=0)
    got = popularity_metrics(split, "test")
    assert got["users"] == split.num_cases("test") > 0
    assert got["cold_share@10"] == 0.0 and got["ndcg@10"] == 0.0  # every target is new, and ranked last
    warm = popularity_metrics(_split(users=200, items=40), "test")
    assert "cold_share@10" not in warm and warm["users"] == 200


def test_protocol_metrics_by_hand() -> None:
    split = apply_protocol(_split(users=50, length=7), "cold-users", share=0.1, seed=1)
    ranks = torch.tensor([0, 30, 2] * 5)  # first 1 item: always a hit at rank 0; first 3: a miss; first 5: rank 2
    got = protocol_metrics(split, "test", ranks)
    assert got["users"] == 15 and got["by_history"]["1"]["ndcg@10"] == 1.0
    assert got["by_history"]["3"]["recall@10"] == 0.0 and got["by_history"]["5"]["ndcg@10"] == pytest.approx(0.5)
    cold = apply_protocol(_split(), "cold-items", share=0.2, seed=3)
    n = cold.num_cases("test")
    top = torch.full((n, 10), 0)
    top[0, :4] = cold.num_train_items  # 4 new items in the first case's top 10
    got = protocol_metrics(cold, "test", torch.zeros(n), top)
    assert got["cold_share@10"] == pytest.approx(4 / (10 * n))


def test_cold_protocols_need_item_sequence_input() -> None:
    with pytest.raises(ConfigError, match="data.protocol"):
        load_config("tiny", ["user.input=text", "data.protocol=cold-items"])
    with pytest.raises(ConfigError, match="input_table"):
        load_config("tiny", [*ITEMS, "data.protocol=cold-items", "user.input_table=own"])


@pytest.mark.parametrize("protocol", ["cold-items", "cold-users"])
def test_training_and_serving_under_a_cold_protocol(tiny_catalog: Path, tmp_path: Path, protocol: str) -> None:
    """A run trains without the held-out items or users, writes no id vector for new items, reports the
    protocol, and the served evaluation scores the same cases with the same figures."""
    from data.catalog import load_catalog
    from data.protocol import split_catalog
    from data.rundir import RunDir
    from index.build import build_index
    from index.evaluate import evaluate
    from train.loop import train

    config = load_config("tiny", [*ITEMS, "train.epochs=2", f"data.protocol={protocol}", "data.cold_share=0.2"])
    run = tmp_path / "run"
    result = train(config, tiny_catalog, run, progress=False)
    split = split_catalog(config, load_catalog(tiny_catalog))
    id_table = RunDir(run).read_id_table()
    assert len(id_table) == split.num_train_items and not set(id_table.ids) & set(split.item_ids[split.num_train_items:])
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["protocol"] == protocol and result.test["users"] == split.num_cases("test")
    build_index(run, progress=False)
    served = evaluate(run, rerank=False, progress=False)
    assert served["protocol"] == protocol and served["users"] == split.num_cases("test")
    for key in ("recall@10", "ndcg@10", "mrr@10", "recall@20", "ndcg@20"):
        assert served["retrieval"][key] == pytest.approx(result.test[key], abs=2e-4), key
    if protocol == "cold-items":
        assert served["retrieval"]["cold_share@10"] == pytest.approx(result.test["cold_share@10"], abs=1e-3)
        assert 0 < result.test["cold_share@10"] <= 1  # content alone puts new items in reach
    else:
        assert set(served["retrieval"]["by_history"]) == {"1", "3", "5"}
        for k, m in served["retrieval"]["by_history"].items():
            assert m["ndcg@10"] == pytest.approx(result.test["by_history"][k]["ndcg@10"], abs=2e-4)


def test_cli_train_takes_the_protocol(tiny_catalog: Path, tmp_path: Path) -> None:
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[2]
    out = subprocess.run([sys.executable, "cli.py", "train", "--config", "tiny", "--catalog", str(tiny_catalog),
                          "--run", str(tmp_path / "run"), "--protocol", "cold-items", "--json",
                          *[a for s in [*ITEMS, "train.epochs=1"] for a in ("--set", s)]],
                         cwd=root, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    line = json.loads(out.stdout.strip().splitlines()[-1])
    assert line["protocol"] == "cold-items" and "cold_share@10" in line["test_retrieval"]
    bad = subprocess.run([sys.executable, "cli.py", "train", "--config", "tiny", "--catalog", str(tiny_catalog),
                          "--run", str(tmp_path / "r2"), "--protocol", "cold"], cwd=root, capture_output=True,
                         text=True)
    assert bad.returncode == 2 and "--protocol" in bad.stderr


def test_rerank_examples_follow_the_protocol() -> None:
    """The reranker fine-tunes on training items only (never a new item or a cold user's) and is validated on
    the protocol's cases."""
    from train.rerank import held_out_example

    split = apply_protocol(_split(), "cold-items", share=0.2, seed=3)
    for u in range(split.num_users):
        for back in range(4):
            example = held_out_example(split, u, "train", back)
            if example is not None:
                target, history = example
                assert target < split.num_train_items and (history < split.num_train_items).all()
    for i in range(split.num_cases("valid")):
        target, history = held_out_example(split, i, "valid")
        assert target >= split.num_train_items
        assert history.tolist() == split.sequences[split.case_user(i, "valid")][:-2].tolist()
    users = apply_protocol(_split(users=50, length=7), "cold-users", share=0.1, seed=1)
    assert all(held_out_example(users, u, "train") is None for u in users.cold_users)
