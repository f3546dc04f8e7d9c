"""Reranker fine-tuning on the tiny run: training examples come from training items only, the retriever's own
top-N is the candidate list, the adapter is saved into the run and served, and the fusion weight is tuned."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import cli
from data.protocol import split_catalog
from data.rundir import RunDir
from errors import ConfigError
from index.evaluate import evaluate
from rerank.pipeline import Pipeline
from train import rerank as train_rerank
from train.rerank import (
    WEIGHTS,
    Example,
    held_out_example,
    rerank_metrics,
    retriever_candidates,
    train_reranker,
    tune_weight,
)

FAST = ["rerank.train_users=12", "rerank.eval_users=10", "rerank.epochs=1", "rerank.train_batch=4"]


@pytest.fixture(scope="module")
def split(rec: Pipeline, tiny_run: Path):
    return split_catalog(rec.config, RunDir(tiny_run).load_catalog())


def test_training_examples_stop_before_the_validation_item(rec: Pipeline, split) -> None:
    users = list(range(split.num_users))
    examples = retriever_candidates(rec, split, users, "train", 10)
    assert len(examples) == sum(len(s) >= 4 for s in split.sequences) > 0
    for e in examples:
        seq = split.sequences[e.user]
        target, history = held_out_example(split, e.user, "train")
        assert target == seq[-3] and list(history) == list(seq[:-3])  # never the validation or test item
        assert e.target == rec.index_items.row(split.item_ids[seq[-3]])
        assert e.history == [rec.index_items.row(split.item_ids[j]) for j in seq[:-3]]
        assert len(e.candidates) == 10 and len(set(e.candidates)) == 10
        assert not (set(e.candidates) - {e.target}) & set(e.history)  # the history is excluded, never the target
        assert list(e.retrieval) == sorted(e.retrieval, reverse=True)
    # A short sequence has no example that far back (the slice must not wrap round to the held-out items).
    short = next(u for u, s in enumerate(split.sequences) if len(s) >= 4)
    n = len(split.sequences[short])
    assert held_out_example(split, short, "train", n - 4) is not None
    assert held_out_example(split, short, "train", n - 3) is None and held_out_example(split, short, "train", n) is None
    # More positions per user: each earlier training item after the history before it, never later items.
    more = retriever_candidates(rec, split, users, "train", 10, positions=3)
    assert len(more) == sum(max(0, min(3, len(s) - 3)) for s in split.sequences) > len(examples)
    for e in more:
        seq = [rec.index_items.row(split.item_ids[j]) for j in split.sequences[e.user]]
        p = len(e.history)
        assert 1 <= p <= len(seq) - 3 and seq[:p] == e.history and seq[p] == e.target


def test_retriever_candidates_match_the_served_evaluation(rec: Pipeline, split, tiny_run: Path) -> None:
    """The exact top-20 over the run's item vectors ranks like the FAISS index does in `evaluate`."""
    examples = retriever_candidates(rec, split, list(range(split.num_users)), "test", 20)
    served = evaluate(tiny_run, rerank=False, progress=False, recommender=rec)["retrieval"]
    ours = rerank_metrics(examples, None, 0.0)
    for key in ("recall@5", "ndcg@10", "recall@20"):
        assert ours[key] == pytest.approx(served[key], abs=1e-4)


def test_tune_weight_picks_the_best_fusion_on_validation() -> None:
    def example(target: int) -> Example:
        return Example(0, [9], target, [0, 1, 2, 3], np.array([0.9, 0.8, 0.7, 0.6], dtype=np.float32))

    examples = [example(3), example(2)]
    helpful = [torch.tensor([0.0, 0.0, 0.0, 9.0]), torch.tensor([0.0, 0.0, 9.0, 0.0])]  # LLM finds both targets
    weight, table = tune_weight(examples, helpful)
    assert weight > 0 and table[weight] == pytest.approx(1.0)  # both targets first
    assert table[0.0] == rerank_metrics(examples, None, 0.0)["ndcg@10"]  # weight 0 is the retriever's order
    useless = [torch.zeros(4), torch.zeros(4)]
    assert tune_weight(examples, useless)[0] == 0.0  # all weights tie: the smallest


def test_two_fold_gain_is_honest_about_noise_and_keeps_a_real_gain() -> None:
    """Reranker scores that are noise: the gain read on the users the weight was tuned on is never below 0
    (weight 0 is always there), and the held-out halves read less. Scores that find the target: the held-out
    halves keep nearly the whole in-sample gain."""
    from train.rerank import two_fold_gain

    def in_sample(examples, scores) -> float:
        return max(tune_weight(examples, scores)[1].values()) / rerank_metrics(examples, None, 0.0)["ndcg@10"] - 1

    retrieval = np.linspace(1.0, 0.0, 10).astype(np.float32)
    for seed in range(3):
        rng = np.random.default_rng(seed)
        examples = [Example(u, [99], int(t), list(range(10)), retrieval) for u, t in enumerate(rng.integers(0, 10, 100))]
        noise = [torch.from_numpy(rng.normal(size=10).astype(np.float32)) for _ in examples]
        held = two_fold_gain(examples, noise, splits=20)
        assert 0 <= in_sample(examples, noise) and held["gain"] < in_sample(examples, noise)
        assert held["p5"] <= held["gain"] <= held["p95"]
    oracle = [torch.nn.functional.one_hot(torch.tensor(e.target), 10).float() for e in examples]
    assert in_sample(examples, oracle) > 1
    assert two_fold_gain(examples, oracle, splits=20)["gain"] == pytest.approx(in_sample(examples, oracle), rel=0.05)


def test_fine_tune_listwise_saves_an_adapter_the_recommender_serves(run: Path, monkeypatch) -> None:
    seen: list[Example] = []
    real_loss = train_rerank._listwise_loss

    def spy(rr, batch, titles, rng):
        seen.extend(batch)
        return real_loss(rr, batch, titles, rng)

    monkeypatch.setattr(train_rerank, "_listwise_loss", spy)
    result = train_reranker(run, "listwise", FAST, device="cpu", progress=False)
    assert result.mode == "listwise" and result.steps == 3 and result.weight in WEIGHTS
    assert [h["step"] for h in result.history] == [0, 3]  # zero-shot first, then once per epoch
    assert set(result.valid) >= {"retrieval", "zero_shot_llm_alone", "fine_tuned_llm_alone", "fused", "two_fold"}
    # Training saw 12 users, each with the retriever's top-10 and the true next training item among them.
    rec = Pipeline.load(run, device="cpu")
    split = split_catalog(rec.config, RunDir(run).load_catalog())
    assert len(seen) == 12
    for e in seen:
        assert e.target in e.candidates and len(e.candidates) == rec.config.rerank.candidates
        assert e.target == rec.index_items.row(split.item_ids[split.sequences[e.user][-3]])
    record = json.loads((run / "rerank" / "listwise.json").read_text())
    assert record["weight"] == result.weight and record["train_users"] == 12
    # Served: the recommender picks the adapter up for its mode, with the tuned weight.
    assert rec.reranker.trained is None  # the run's own mode (pointwise) has no adapter
    rec.configure_rerank(mode="listwise")
    assert rec.reranker.trained is not None and rec.reranker.weight == result.weight
    user = next(iter(rec.histories))
    retrieved = rec.recommend(user_id=user, k=10, rerank=False)
    reranked = rec.recommend(user_id=user, k=10, rerank=True)
    assert {r.item_id for r in reranked} == {r.item_id for r in retrieved}


def test_skipping_missed_targets_trains_on_served_like_lists(run: Path, monkeypatch) -> None:
    """rerank.missed_targets=skip: only examples whose target the retriever found, its list left as retrieved."""
    seen: list[Example] = []
    real_loss = train_rerank._listwise_loss
    found = {}
    real_candidates = train_rerank.retriever_candidates

    def spy_candidates(*args, **kwargs):
        out = real_candidates(*args, **kwargs)
        if args[3] == "train":
            found.update({(e.user, e.target): list(e.candidates) for e in out})
        return out

    def spy(rr, batch, titles, rng):
        seen.extend(batch)
        return real_loss(rr, batch, titles, rng)

    monkeypatch.setattr(train_rerank, "retriever_candidates", spy_candidates)
    monkeypatch.setattr(train_rerank, "_listwise_loss", spy)
    result = train_reranker(run, "listwise", [*FAST, "rerank.missed_targets=skip"], device="cpu", progress=False)
    hits = [key for key, cands in found.items() if key[1] in cands]
    assert 0 < len(hits) < len(found)  # the tiny retriever misses some training targets: they are left out
    assert sorted((e.user, e.target) for e in seen) == sorted(hits)
    assert all(e.candidates == found[(e.user, e.target)] for e in seen)  # nothing was inserted
    assert result.steps == -(-len(hits) // 4)


def test_cli_train_rerank_pointwise(run: Path, capsys) -> None:
    code = cli.main(["train-rerank", "--run", str(run), "--mode", "pointwise", "--json", "--device", "cpu",
                     *[a for s in FAST for a in ("--set", s)], "--set", "rerank.negatives=2"])
    assert code == 0
    printed = capsys.readouterr().out
    assert printed.count("\n") == 1  # --json: one line
    out = json.loads(printed)
    assert out["mode"] == "pointwise" and out["steps"] == 3
    assert (run / "rerank" / "pointwise.safetensors").is_file()
    # Without --json: one summary line, read from what was saved.
    code = cli.main(["train-rerank", "--run", str(run), "--mode", "pointwise", "--quiet", "--device", "cpu",
                     *[a for s in FAST for a in ("--set", s)], "--set", "rerank.negatives=2"])
    assert code == 0
    record = json.loads((run / "rerank" / "pointwise.json").read_text())
    valid = record["valid"]
    assert capsys.readouterr().out == (
        f"reranker (pointwise) saved into {run}: best step {record['best_step']} of {record['steps']}, fusion "
        f"weight {record['weight']:g}, valid NDCG@10 {valid['retrieval']['ndcg@10']:.4f} retrieval -> "
        f"{valid['fused']['ndcg@10']:.4f} reranked on {valid['users']} users ({record['seconds']:.1f} s)\n")
    assert cli.main(["train-rerank", "--run", str(run), "--set", "train.lr=1", "--quiet"]) == 2
    assert "train-rerank changes rerank.* settings only" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="rerank.mode: must be one of"):
        train_reranker(run, overrides=["rerank.mode=generative"], progress=False)


def test_a_run_refit_on_its_validation_items_cannot_tune_or_judge_a_reranker(run: Path, capsys) -> None:
    # train.refit writes its record into metrics.json; the served towers then trained on every validation target
    metrics = json.loads((run / "metrics.json").read_text())
    (run / "metrics.json").write_text(json.dumps({**metrics, "refit": {"epochs": 3, "seconds": 1.0, "history": []}}))
    with pytest.raises(ConfigError, match="refit with every user's validation item"):
        train_reranker(run, "listwise", FAST, device="cpu", progress=False)
    assert cli.main(["train-rerank", "--run", str(run), "--quiet", "--device", "cpu"]) == 2
    assert "--set train.refit=false" in capsys.readouterr().err
    assert not (run / "rerank").exists()  # nothing was written
    bench = Path(__file__).resolve().parents[2] / "benchmarks" / "bench_rerank.py"
    done = subprocess.run([sys.executable, str(bench), "--run", str(run), "--variants", "zero-shot-listwise"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.startswith("bench_rerank: ") and "train.refit=false" in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("protocol", ["cold-items", "cold-users"])
def test_a_refit_leaves_the_cold_protocols_validation_cases_unseen(run: Path, protocol: str) -> None:
    # The refit adds warm users' validation items of trained items: a cold case's item or user is never among them
    config = json.loads((run / "config.json").read_text())
    config["data"]["protocol"] = protocol
    config["user"]["input"], config["user"]["input_table"] = "items", "shared"
    (run / "config.json").write_text(json.dumps(config))
    metrics = json.loads((run / "metrics.json").read_text())
    (run / "metrics.json").write_text(json.dumps({**metrics, "refit": {"epochs": 3, "seconds": 1.0, "history": []}}))
    train_rerank.require_unseen_validation(RunDir(run))  # passes
    config["data"]["protocol"] = "warm"
    (run / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConfigError, match="refit with every user's validation item"):
        train_rerank.require_unseen_validation(RunDir(run))
