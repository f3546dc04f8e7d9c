"""The code paths the shipped ``offline`` setup takes, run with the tiny random models.

``offline`` freezes the user LLM (states cached once), truncates it to its first layers, mean-pools over item
tokens, uses full-catalog negatives and two prompt windows per user, and freezes the text encoder. The ``tiny``
setup alone exercises none of these, so these tests switch them on one by one over the tiny models.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from configs import Config, load_config
from data.profiles import profile_builder
from data.rundir import RunDir
from towers.factory import build_towers, load_towers
from towers.hub import load_tokenizer
from train import loop
from train.loop import (
    build_item_bank,
    build_user_states,
    evaluate_positions,
    load_training_data,
    train,
    user_prompts,
)

# The offline setup's choices, on the tiny models.
OFFLINE_LIKE = ["user.strategy=frozen", "user.pooling=mean", "user.layer=1", "train.negatives=catalog",
                "train.windows=2", "item.text.trainable=false", "item.image.trainable=false"]


def _llm_calls(model) -> list[int]:
    """A counter of forward passes through the user LLM."""
    calls = [0]
    model.user.llm.register_forward_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    return calls


def _rescore(run: Path, catalog: Path) -> dict[str, dict[str, float]]:
    """Validation and test metrics of a saved run, recomputed from its reloaded towers."""
    model = load_towers(run)
    config = model.config
    data = load_training_data(config, catalog)
    bank = build_item_bank(config, model, data, "cpu", progress=False)
    states = build_user_states(config, model, data, "cpu", progress=False)
    with torch.no_grad():
        emb = bank.encode(model)
        return {w: evaluate_positions(model, states, data.split, emb, w) for w in ("valid", "test")}


def _num_pairs(config: Config, data) -> tuple[int, int]:
    """(prompts, training pairs) of the config's prompt windows."""
    builder = profile_builder(config, data.catalog.items, load_tokenizer(config.user.model))
    prompts = user_prompts(data.split, data.split_rows, builder, config.train.max_positions, config.train.windows)
    return len(prompts), sum(len(p.train_pos) for p in prompts)


def test_frozen_llm_states_are_cached_once(tiny_catalog: Path) -> None:
    config = load_config("tiny", ["user.strategy=frozen"])
    data = load_training_data(config, tiny_catalog)
    model = build_towers(config, num_ids=data.split.num_items)
    assert not any(p.requires_grad for p in model.user.llm.parameters())
    states = build_user_states(config, model, data, "cpu", progress=False)
    assert states.cache is not None and len(states.cache) == len(states.prompts) == data.split.num_users

    calls = _llm_calls(model)
    idx = [0, 5, 17, 42]
    got = {w: states.get(idx, w) for w in ("train", "valid", "test")}
    assert calls[0] == 0  # served from the cache
    with torch.no_grad():
        fresh = states._compute(idx)  # (P_i, H) per prompt: training positions, then valid, then test
    assert calls[0] == 1
    n = [len(states.prompts[i].train_pos) for i in idx]
    torch.testing.assert_close(got["train"][0], torch.cat([f[:k] for f, k in zip(fresh, n)]), atol=1e-6, rtol=0)
    torch.testing.assert_close(got["valid"][0], torch.stack([f[k] for f, k in zip(fresh, n)]), atol=1e-6, rtol=0)
    torch.testing.assert_close(got["test"][0], torch.stack([f[k + 1] for f, k in zip(fresh, n)]), atol=1e-6, rtol=0)
    assert got["train"][1].tolist() == [t for i in idx for t in states.prompts[i].train_targets]
    assert not got["train"][0].requires_grad


def test_trainable_llm_has_no_cache_and_gets_gradients(tiny_catalog: Path) -> None:
    config = load_config("tiny", ["user.strategy=full"])
    data = load_training_data(config, tiny_catalog)
    model = build_towers(config, num_ids=data.split.num_items)
    states = build_user_states(config, model, data, "cpu", progress=False)
    assert states.cache is None

    calls = _llm_calls(model)
    s, targets = states.get([0, 1, 2], "train")  # (N, H), recomputed with gradients
    assert calls[0] == 1 and s.requires_grad and len(s) == len(targets)
    u = model.user.head(s)  # (N, D)
    (u @ torch.randn(u.shape[1], 7)).logsumexp(1).sum().backward()
    grads = [p.grad for p in model.user.llm.parameters()]
    assert all(g is not None for g in grads)
    assert sum(float(g.abs().sum()) for g in grads) > 0
    assert float(model.user.llm.layers[0].self_attn.q_proj.weight.grad.abs().sum()) > 0


def test_layer_truncation_and_mean_pooling(tiny_catalog: Path) -> None:
    config = load_config("tiny", ["user.strategy=frozen", "user.pooling=mean", "user.layer=1"])
    data = load_training_data(config, tiny_catalog)
    model = build_towers(config, num_ids=data.split.num_items)
    llm = model.user.llm
    assert len(llm.layers) == 1 and llm.config.num_hidden_layers == 1
    assert isinstance(llm.norm, nn.Identity)

    # The truncated LLM's output is the full LLM's output after its first layer (same random weights).
    full = build_towers(load_config("tiny", ["user.strategy=frozen"])).user.llm.eval()
    assert len(full.layers) == 2
    states = build_user_states(config, model, data, "cpu", progress=False)
    content_start = states.content_start
    assert 0 < content_start < min(p.read_positions[0] for p in states.prompts)  # the header is skipped
    for i in (0, 9, 33):
        prompt = states.prompts[i]
        ids = torch.tensor([prompt.input_ids])
        with torch.no_grad():
            h = llm.eval()(input_ids=ids, attention_mask=torch.ones_like(ids)).last_hidden_state[0]  # (T, H)
            h_full = full(input_ids=ids, attention_mask=torch.ones_like(ids), output_hidden_states=True)
        torch.testing.assert_close(h, h_full.hidden_states[1][0], atol=1e-5, rtol=1e-5)
        # Mean pooling by hand: the mean of the states over the item tokens content_start..p.
        expected = torch.stack([h[content_start:p + 1].mean(0) for p in prompt.read_positions])  # (P, H)
        n = len(prompt.train_pos)
        got = torch.cat([states.get([i], w)[0] for w in ("train", "valid", "test")])
        assert got.shape == expected.shape and len(got) == n + 2
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
        # and it is neither the last token's state nor a mean that includes the header
        assert not torch.allclose(got, h[prompt.read_positions], atol=1e-3)
        with_header = torch.stack([h[:p + 1].mean(0) for p in prompt.read_positions])
        assert not torch.allclose(got, with_header, atol=1e-3)


def test_catalog_negatives_and_two_windows_train_end_to_end(tiny_catalog: Path, tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    config = load_config("tiny", OFFLINE_LIKE)
    data = load_training_data(config, tiny_catalog)
    one = _num_pairs(load_config("tiny", OFFLINE_LIKE + ["train.windows=1"]), data)
    two = _num_pairs(config, data)
    assert one[0] == data.split.num_users
    assert two[0] > one[0] and two[1] > one[1], (one, two)

    # Catalog negatives: every training step scores the whole item bank (no item subset is passed).
    encoded = []
    encode = loop.ItemBank.encode

    def spy(self, model, items=None, dropout=0.0):
        encoded.append((items is None, dropout))
        return encode(self, model, items, dropout)

    monkeypatch.setattr(loop.ItemBank, "encode", spy)
    result = train(config, tiny_catalog, tmp_path / "run", progress=False)
    train_calls = [full for full, dropout in encoded if dropout > 0]  # training encodes with modality dropout
    assert train_calls and all(train_calls)
    monkeypatch.undo()

    run = RunDir(tmp_path / "run")
    assert run.is_run() and run.read_config() == config
    metrics = run.read_metrics()
    assert metrics["valid"]["users"] == data.split.num_users and len(metrics["history"]) >= 1
    again = _rescore(run.path, tiny_catalog)  # reloaded towers (frozen LLM and text from their references)
    for which in ("valid", "test"):
        assert again[which]["ndcg@10"] == pytest.approx(getattr(result, which)["ndcg@10"], abs=1e-9)
        assert again[which]["recall@10"] == pytest.approx(getattr(result, which)["recall@10"], abs=1e-9)


def test_early_stopping_saves_the_best_epoch_not_the_last(tiny_catalog: Path, tmp_path: Path) -> None:
    epochs = 10
    config = load_config("tiny", OFFLINE_LIKE + [f"train.epochs={epochs}", "train.patience=1", "train.lr=0.03"])
    result = train(config, tiny_catalog, tmp_path / "run", progress=False)
    history = [h["ndcg@10"] for h in result.history]
    assert len(history) < epochs  # stopped early
    assert result.best_epoch == max(range(len(history)), key=history.__getitem__)
    assert result.best_epoch < len(history) - 1
    best = history[result.best_epoch]
    assert best > history[-1]  # the last epoch is worse, so saving it would be visible

    metrics = RunDir(tmp_path / "run").read_metrics()
    assert metrics["best_epoch"] == result.best_epoch
    assert metrics["valid"]["ndcg@10"] == pytest.approx(best, abs=1e-9)  # all users are scored every epoch
    again = _rescore(tmp_path / "run", tiny_catalog)
    assert again["valid"]["ndcg@10"] == pytest.approx(best, abs=1e-9)
    assert again["test"]["ndcg@10"] == pytest.approx(metrics["test"]["ndcg@10"], abs=1e-9)
