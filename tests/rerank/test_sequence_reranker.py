"""The item-sequence cross-encoder reranker (rerank.mode: sequence): one pass scores each candidate exactly as a
causal pass over the history followed by that candidate alone would; order and company do not change a score;
it fine-tunes, is saved, served, and refused once the run's user tower changes."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

import cli
from configs import load_config
from errors import CheckpointError, ConfigError, QueryError
from index.build import build_index
from rerank.pipeline import Pipeline
from rerank.sequence import SequenceReranker
from train.loop import train
from train.rerank import WEIGHTS, train_reranker

ITEMS = ["user.input=items", "user.init=random", "item.image.enabled=false", "item.audio.enabled=false",
         "train.epochs=1"]
FAST = ["rerank.train_users=20", "rerank.eval_users=10", "rerank.epochs=1", "rerank.train_positions=2",
        "rerank.train_batch=8"]


@pytest.fixture(scope="module")
def items_run(tiny_catalog: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny run with the item-sequence user tower and a live index."""
    run = tmp_path_factory.mktemp("seq-run") / "run"
    train(load_config("tiny", ITEMS), tiny_catalog, run, progress=False)
    build_index(run, progress=False)
    return run


@pytest.fixture(scope="module")
def rec(items_run: Path) -> Pipeline:
    return Pipeline.load(items_run, device="cpu")


@pytest.fixture(scope="module")
def scorer(rec: Pipeline) -> SequenceReranker:
    """A sequence reranker with non-trivial adapters, marker and head (seeded), in eval mode."""
    rec.configure_rerank(mode="sequence")
    rr = rec.build_reranker(adapter=False)
    rr.add_lora()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in rr.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return rr.eval()


def _reference(rr: SequenceReranker, history: list[int], candidate: int) -> float:
    """The slow way: a plain causal pass over the history and then this one candidate; its last state scored."""
    rows = torch.as_tensor(history[-rr.max_len:] + [candidate])
    x = rr._inputs(rows.unsqueeze(0))
    x[0, -1] += rr.marker
    h = rr.user.llm(inputs_embeds=x, attention_mask=torch.ones(1, len(rows), dtype=torch.long),
                    use_cache=False).last_hidden_state[0, -1]
    return float(rr.head((h.float() - rr.user.state_mean) / rr.user.state_scale))


@torch.no_grad()
def test_one_pass_equals_one_causal_pass_per_candidate(scorer: SequenceReranker) -> None:
    histories = [[3, 7, 1, 9, 4], [12, 5], [8]]
    candidates = [[20, 21, 22, 23], [30, 31], [40, 41, 42]]
    got = scorer.score_rows(histories, candidates)
    for h, cands, s in zip(histories, candidates, got):
        want = torch.tensor([_reference(scorer, h, c) for c in cands])
        torch.testing.assert_close(s, want, atol=1e-4, rtol=1e-4)
    assert float(got[0].std()) > 0  # the head is not trivially constant


@torch.no_grad()
def test_a_score_ignores_candidate_order_and_company(scorer: SequenceReranker) -> None:
    history = [5, 6, 7, 8, 9, 10]
    cands = [11, 12, 13, 14, 15]
    base = scorer.score_rows([history], [cands])[0]
    perm = [3, 0, 4, 1, 2]
    shuffled = scorer.score_rows([history], [[cands[i] for i in perm]])[0]
    torch.testing.assert_close(shuffled, base[perm], atol=1e-5, rtol=1e-5)
    alone = scorer.score_rows([history], [[cands[2]]])[0]
    torch.testing.assert_close(alone, base[2:3], atol=1e-5, rtol=1e-5)
    # batched with a longer history and a longer list (padding on both parts) changes nothing
    both = scorer.score_rows([history, list(range(30, 60))], [cands, list(range(60, 70))])
    torch.testing.assert_close(both[0], base, atol=1e-5, rtol=1e-5)


def test_bad_input_is_named(scorer: SequenceReranker, tiny_run: Path) -> None:
    with pytest.raises(QueryError, match="history 0 is empty"):
        scorer.score_rows([[]], [[1, 2]])
    with pytest.raises(QueryError, match="candidate list 1 is empty"):
        scorer.score_rows([[1], [2]], [[3], []])
    text = Pipeline.load(tiny_run, device="cpu")  # the text-profile user tower
    text.configure_rerank(mode="sequence")
    with pytest.raises(ConfigError, match="item-sequence user tower"):
        text.build_reranker()


def test_fine_tune_serve_and_refuse_after_retraining(items_run: Path, tmp_path: Path, capsys) -> None:
    run = Path(shutil.copytree(items_run, tmp_path / "run"))
    rec = Pipeline.load(run, device="cpu")
    rec.configure_rerank(mode="sequence")
    with pytest.raises(CheckpointError, match="train-rerank --run .* --mode sequence"):
        rec.build_reranker()  # nothing to serve before fine-tuning
    user = next(iter(rec.histories))
    query = ["query", "--run", str(run), "--user", str(user), "--rerank", "on", "--rerank-mode", "sequence",
             "--json", "--device", "cpu"]
    assert cli.main(query) == 2
    assert "no fine-tuned sequence reranker" in capsys.readouterr().err
    result = train_reranker(run, "sequence", FAST, device="cpu", progress=False, recommender=rec)
    record = json.loads((run / "rerank" / "sequence.json").read_text())
    # auto: only the lists whose target the retriever found (of 20 users x 2 positions), 8 per step
    assert record["missed_targets"] == "skip" and 0 < record["train_examples"] < 40
    assert result.mode == "sequence" and result.weight in WEIGHTS and result.steps == -(-record["train_examples"] // 8)
    assert record["train_positions"] == 2 and record["history"][0]["step"] == 0
    assert record["lr"] == 5e-4 and record["train_batch"] == 8  # rerank.lr=0: the sequence mode's own rate
    # step 0 is the retriever's own order: the head starts at zero
    assert record["history"][0]["fused_ndcg@10"] == result.valid["retrieval"]["ndcg@10"]
    served = Pipeline.load(run, device="cpu")
    served.configure_rerank(mode="sequence")
    assert served.reranker.trained is not None and served.reranker.weight == result.weight
    assert cli.main(query) == 0
    items = json.loads(capsys.readouterr().out)["items"]
    assert len(items) == 10 and all(i["rerank_score"] is not None for i in items)
    retrieved = served.recommend(user_id=user, k=10, rerank=False)
    reranked = served.recommend(user_id=user, k=10, rerank=True)
    assert {r.item_id for r in reranked} == {r.item_id for r in retrieved}
    assert all(r.rerank_score is not None for r in reranked)
    # Reasons need a text LM, which the sequence reranker has not: a zero-shot one is built for them.
    reasons = served.explain(user, reranked[:2])
    assert len(reasons) == 2 and all(r.cites for r in reasons)
    assert served._text_reranker is not served.reranker and served._text_reranker.cfg.mode == "listwise"
    # Retrained towers (here: one weight changed) make the adapter stale: refused, never served.
    from safetensors.torch import load_file, save_file

    weights = run / "towers.safetensors"
    state = load_file(str(weights))
    key = next(k for k in state if k.startswith("user.") and state[k].is_floating_point())
    state[key] = state[key] + 1.0
    from safetensors import safe_open

    with safe_open(str(weights), framework="pt") as f:
        meta = f.metadata()
    save_file(state, str(weights), metadata=meta)
    stale = Pipeline.load(run, device="cpu")
    stale.configure_rerank(mode="sequence")
    with pytest.raises(CheckpointError, match="another user tower"):
        stale.build_reranker()


def test_sequence_training_step_lowers_the_loss(scorer: SequenceReranker, rec: Pipeline) -> None:
    """A few steps on one batch fit it: the cross-encoder can learn which candidate follows a history."""
    from train.rerank import Example, _sequence_loss

    rr = rec.build_reranker(adapter=False)
    rr.add_lora()
    rng = np.random.default_rng(0)
    batch = [Example(u, rng.choice(100, 6, replace=False).tolist(), 0, [], np.zeros(8)) for u in range(8)]
    for e in batch:
        e.candidates = rng.choice(np.arange(100, 150), 8, replace=False).tolist()
        e.target = e.candidates[int(rng.integers(8))]
    params = [p for p in rr.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=3e-3)
    rr.eval()  # no dropout: a deterministic trajectory (gradients flow all the same)
    losses = []
    for _ in range(100):
        opt.zero_grad()
        losses.append(_sequence_loss(rr, batch))
        opt.step()
    assert losses[0] == pytest.approx(np.log(8), abs=1e-3)  # the zero head: every candidate alike
    assert losses[-1] < 0.25 * losses[0]
