"""LLMReranker on the tiny random decoder: the shared KV prefix is exact, the listwise verbalizer equals a slow
per-letter reference, LoRA adapters train, save and load, and the score combination."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from configs import RerankConfig, load_config
from data.profiles import ProfileBuilder
from errors import CheckpointError, ConfigError, ModelLoadError, QueryError
from rerank.llm import LLMReranker, _zscore, cache_kwarg
from towers.hub import load_tokenizer

MODEL = load_config("tiny").user.model  # random:tiny-decoder
TITLES = [
    "Toy Story (1995)",
    "Star Wars (1977)",
    "Dr. Strangelove or: How I Learned to Stop Worrying and Love the Bomb (1963)",
    "Fargo (1996)",
    "Wallace & Gromit: The Best of Aardman Animation (1996)",
    "Heat (1995)",
    "Contact (1997)",
]


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(MODEL)


@pytest.fixture(scope="module")
def reranker(tokenizer) -> LLMReranker:
    # batch_size 3 over 7 candidates: full and partial batches, with question lengths that need padding.
    return LLMReranker(RerankConfig(batch_size=3), MODEL, tokenizer)


@pytest.fixture(scope="module")
def profile_ids(tokenizer) -> list[int]:
    builder = ProfileBuilder(tokenizer, ["Babe (1995)", "GoldenEye (1995)", "Twelve Monkeys (1995)"],
                             token_budget=96)
    return builder.build([0, 1, 2]).input_ids


def _reference_log_odds(reranker: LLMReranker, profile_ids: list[int], title: str) -> float:
    """Log-odds from one full forward pass over ``profile + question`` (no cache, no padding)."""
    ids = torch.tensor([profile_ids + reranker.question_ids(title)])
    with torch.no_grad():
        logits = reranker.lm(input_ids=ids).logits[0, -1].float().log_softmax(-1)
    return float(logits[reranker.yes_id] - logits[reranker.no_id])


def test_answer_tokens(reranker: LLMReranker, tokenizer) -> None:
    assert reranker.yes_id != reranker.no_id
    assert tokenizer.decode([reranker.yes_id]).strip().lower() == "yes"
    assert tokenizer.decode([reranker.no_id]).strip().lower() == "no"
    assert not any(p.requires_grad for p in reranker.lm.parameters())


def test_shared_prefix_equals_full_prompts(reranker: LLMReranker, profile_ids: list[int]) -> None:
    lengths = {len(reranker.question_ids(t)) for t in TITLES}
    assert len(lengths) > 2  # the question batches really are padded
    got = reranker.log_odds(profile_ids, TITLES)
    want = torch.tensor([_reference_log_odds(reranker, profile_ids, t) for t in TITLES])
    assert got.shape == (len(TITLES),)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=0)
    assert want.std() > 1e-3  # candidates get different scores, so a mix-up of rows would be caught


def test_log_odds_independent_of_batching(reranker: LLMReranker, profile_ids: list[int], tokenizer) -> None:
    one_batch = LLMReranker(RerankConfig(batch_size=len(TITLES)), MODEL, tokenizer)
    torch.testing.assert_close(one_batch.log_odds(profile_ids, TITLES), reranker.log_odds(profile_ids, TITLES),
                               atol=1e-4, rtol=0)
    # The cached prefix is not consumed: a second call on the same profile gives the same scores.
    torch.testing.assert_close(reranker.log_odds(profile_ids, TITLES[:2]), reranker.log_odds(profile_ids, TITLES)[:2],
                               atol=1e-4, rtol=0)


class _PastKeyValuesDecoder(nn.Module):
    """The decoder API of transformers 5.0 to 5.23 around the real decoder: the cache goes in as
    ``past_key_values=`` and comes out as ``.past_key_values``; an unknown ``cache=`` is swallowed by ``**kwargs``
    (what 5.17 does, which made the reranker fail with "no attribute 'cache'")."""

    def __init__(self, body: nn.Module):
        super().__init__()
        self.body = body

    def forward(self, input_ids, attention_mask=None, position_ids=None, past_key_values=None, use_cache=None,
                **kwargs):
        out = self.body(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                        use_cache=use_cache, **{cache_kwarg(self.body): past_key_values})
        return SimpleNamespace(last_hidden_state=out.last_hidden_state, past_key_values=past_key_values)


class _CacheDecoder(_PastKeyValuesDecoder):
    """The API from 5.24: ``cache=`` in, ``.cache`` out, an unknown ``past_key_values=`` swallowed."""

    def forward(self, input_ids, attention_mask=None, position_ids=None, cache=None, use_cache=None, **kwargs):
        out = super().forward(input_ids, attention_mask, position_ids, past_key_values=cache, use_cache=use_cache)
        return SimpleNamespace(last_hidden_state=out.last_hidden_state, cache=cache)


@pytest.mark.parametrize("api", [_PastKeyValuesDecoder, _CacheDecoder])
def test_shared_prefix_with_either_cache_api(api: type, reranker: LLMReranker, profile_ids: list[int],
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """Both spellings of the KV-cache argument across transformers 5.x give the full-prompt scores."""
    want = torch.tensor([_reference_log_odds(reranker, profile_ids, t) for t in TITLES])
    shim = api(reranker.lm.get_decoder())
    monkeypatch.setattr(reranker.lm, "get_decoder", lambda: shim)
    torch.testing.assert_close(reranker.log_odds(profile_ids, TITLES), want, atol=1e-4, rtol=0)


def test_cache_kwarg_detection() -> None:
    class NoCache(nn.Module):
        def forward(self, input_ids, **kwargs):
            return input_ids

    assert cache_kwarg(_PastKeyValuesDecoder(NoCache())) == "past_key_values"
    assert cache_kwarg(_CacheDecoder(NoCache())) == "cache"
    with pytest.raises(ModelLoadError, match="takes neither cache= nor past_key_values="):
        cache_kwarg(NoCache())


def test_combine_weight_zero_keeps_retrieval_order(tokenizer) -> None:
    reranker = LLMReranker(RerankConfig(weight=0.0), MODEL, tokenizer)
    retrieval = torch.tensor([0.9, 0.7, 0.65, 0.3, 0.1])
    llm = torch.tensor([-3.0, 5.0, 0.0, 8.0, 2.0])
    final = reranker.combine(retrieval, llm)
    assert torch.argsort(final, descending=True).tolist() == [0, 1, 2, 3, 4]
    torch.testing.assert_close(final, _zscore(retrieval))


def test_combine_formula(reranker: LLMReranker) -> None:
    retrieval = torch.tensor([0.9, 0.7, 0.5])
    llm = torch.tensor([-1.0, 0.0, 4.0])
    final = reranker.combine(retrieval, llm)
    # z-scores with the unbiased std: retrieval (1, 0, -1); llm mean 1, std sqrt(7) -> (-2, -1, 3) / sqrt(7).
    s7 = 7 ** 0.5
    want = torch.tensor([1 - 2 / s7, 0 - 1 / s7, -1 + 3 / s7])
    torch.testing.assert_close(final, want, atol=1e-5, rtol=0)
    assert torch.argsort(final, descending=True).tolist() == [0, 2, 1]  # 0.244, -0.378, 0.134
    assert reranker.combine(torch.tensor([0.5]), torch.tensor([3.0])).tolist() == [0.0]


# -- listwise verbalizer -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def listwise(tokenizer) -> LLMReranker:
    # batch_size 2: prompts of one user's permutations and of several users are split across passes.
    return LLMReranker(RerankConfig(mode="listwise", batch_size=2), MODEL, tokenizer)


def _reference_letters(rr: LLMReranker, profile_ids: list[int], titles: list[str]) -> torch.Tensor:
    """The slow reference: one full forward per candidate, each reading that candidate's own letter logit from the
    full-vocabulary output at the answer position (no padding, no batching, no restricted head)."""
    prompt = rr.list_prompt(profile_ids, titles)
    out = []
    for j in range(len(titles)):
        ids = torch.tensor([prompt + [rr.letter_ids[j]]])  # the prompt, then the letter as if it were answered
        with torch.no_grad():
            logits = rr.lm(input_ids=ids).logits[0, -2].float()  # the answer position
        out.append(logits[rr.letter_ids[j]])
    return torch.stack(out)


def test_letter_tokens(listwise: LLMReranker, tokenizer) -> None:
    assert len(set(listwise.letter_ids)) == 26
    assert [tokenizer.decode([t]).strip().lower() for t in listwise.letter_ids[:3]] == ["a", "b", "c"]
    prompt = listwise.list_prompt([5, 6], TITLES[:3])
    text = tokenizer.decode(prompt)
    assert "( a ) toy story" in text and "( c ) dr. strangelove" in text  # the lettered list, in the given order
    assert prompt[-len(listwise.open_ids):] == listwise.open_ids  # ends with "(": the next token is the letter
    # Each title is cut to rerank.title_tokens.
    short = LLMReranker(RerankConfig(mode="listwise", title_tokens=2), MODEL, tokenizer)
    assert "strangelove" not in tokenizer.decode(short.list_prompt([5], TITLES[2:3]))


def test_verbalizer_equals_slow_reference(listwise: LLMReranker, profile_ids: list[int]) -> None:
    torch.manual_seed(0)
    got = listwise.listwise([profile_ids], [TITLES])[0]
    want = _reference_letters(listwise, profile_ids, TITLES)
    assert got.shape == (len(TITLES),)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=0)
    assert want.std() > 1e-3  # letters get different scores, so a mix-up of rows would be caught
    assert torch.equal(listwise.score(profile_ids, TITLES), got)  # the configured mode dispatches to it


def test_listwise_batches_users_of_different_lengths(listwise: LLMReranker, profile_ids: list[int]) -> None:
    """Right-padded rows of users with different prompt lengths and candidate counts score as they would alone."""
    profiles = [profile_ids, profile_ids[:4], profile_ids]
    titles = [TITLES, TITLES[:2], TITLES[3:]]
    batched = listwise.listwise(profiles, titles)
    for p, t, got in zip(profiles, titles, batched):
        torch.testing.assert_close(got, _reference_letters(listwise, p, t), atol=1e-4, rtol=0)


def test_permutations_average_letter_logits(tokenizer, profile_ids: list[int]) -> None:
    rr = LLMReranker(RerankConfig(mode="listwise", permutations=3, seed=7, batch_size=2), MODEL, tokenizer)
    perms = rr.permutations(len(TITLES))
    assert len(perms) == 3 and perms[0].tolist() == list(range(len(TITLES)))
    assert perms[1].tolist() != perms[0].tolist() and sorted(perms[1].tolist()) == list(range(len(TITLES)))
    want = torch.zeros(len(TITLES))
    for perm in perms:  # candidate perm[j] is shown with letter j
        want[perm] += _reference_letters(rr, profile_ids, [TITLES[int(i)] for i in perm])
    torch.testing.assert_close(rr.listwise([profile_ids], [TITLES])[0], want / 3, atol=1e-4, rtol=0)
    assert [p.tolist() for p in rr.permutations(len(TITLES))] == [p.tolist() for p in perms]  # seeded


def test_listwise_limits(listwise: LLMReranker, tokenizer) -> None:
    with pytest.raises(QueryError, match="1 to 26 candidates"):
        listwise.list_prompt([5], [f"Film {i}" for i in range(27)])
    with pytest.raises(ConfigError, match=r"rerank.candidates: listwise mode .* at most 26"):
        load_config("tiny", ["rerank.mode=listwise", "rerank.candidates=30"])
    with pytest.raises(ConfigError, match="rerank.mode: must be one of"):
        load_config("tiny", ["rerank.mode=generative"])


def test_pointwise_training_path_equals_inference(reranker: LLMReranker, profile_ids: list[int]) -> None:
    """The differentiable pointwise path (one batch, cache repeated in place) gives the cached-inference scores."""
    got = reranker.log_odds_train(profile_ids, TITLES)
    torch.testing.assert_close(got.detach(), reranker.log_odds(profile_ids, TITLES), atol=1e-4, rtol=0)


# -- LoRA adapters -------------------------------------------------------------------------------------------


def test_lora_training_step_learns_and_touches_only_the_adapter(tokenizer, profile_ids: list[int]) -> None:
    torch.manual_seed(0)
    rr = LLMReranker(RerankConfig(mode="listwise", lora_layers=1, lora_dropout=0.0), MODEL, tokenizer)
    base = {k: v.clone() for k, v in rr.lm.state_dict().items()}
    rr.add_lora()
    trainable = [n for n, p in rr.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n and ".layers.1." in n for n in trainable)  # top layer only
    params = [p for p in rr.parameters() if p.requires_grad]
    optim = torch.optim.AdamW(params, lr=3e-2)
    prompt = rr.list_prompt(profile_ids, TITLES)
    target = 5
    before = torch.log_softmax(rr.letter_logits([prompt])[0, : len(TITLES)], -1)[target].item()
    for _ in range(15):
        optim.zero_grad()
        loss = torch.nn.functional.cross_entropy(rr.letter_logits([prompt])[:, : len(TITLES)], torch.tensor([target]))
        loss.backward()
        optim.step()
    after = torch.log_softmax(rr.letter_logits([prompt])[0, : len(TITLES)], -1)[target].item()
    assert after > before + 0.5  # the true letter gains probability
    merged = {k.replace("base_model.model.", "").replace(".base_layer", ""): v
              for k, v in rr.lm.state_dict().items() if "lora_" not in k}
    assert all(torch.equal(merged[k], v) for k, v in base.items())  # the base weights never move


def test_adapter_save_load_round_trip(tokenizer, profile_ids: list[int], tmp_path) -> None:
    torch.manual_seed(0)
    cfg = RerankConfig(mode="listwise", lora_layers=1, history_tokens=64, title_tokens=8)
    rr = LLMReranker(cfg, MODEL, tokenizer)
    rr.add_lora()
    with torch.no_grad():
        for name, p in rr.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)  # a non-identity adapter
    rr.eval()
    rr.weight = 0.75
    want = rr.listwise([profile_ids], [TITLES])[0]
    rr.save_adapter(tmp_path, {"best_step": 3})
    assert (tmp_path / "rerank" / "listwise.safetensors").is_file()
    # Served with another config: the adapter's weight and prompt settings come back with it.
    fresh = LLMReranker(RerankConfig(mode="listwise", weight=0.1), MODEL, tokenizer)
    zero_shot = fresh.listwise([profile_ids], [TITLES])[0]
    assert fresh.load_adapter(tmp_path)
    assert fresh.weight == 0.75 and fresh.trained["best_step"] == 3
    assert (fresh.cfg.history_tokens, fresh.cfg.title_tokens) == (64, 8)
    torch.testing.assert_close(fresh.listwise([profile_ids], [TITLES])[0], want, atol=1e-5, rtol=0)
    assert not torch.allclose(zero_shot, want)
    # Another mode has no adapter there: zero-shot. An adapter of another model is refused.
    assert not LLMReranker(RerankConfig(mode="pointwise"), MODEL, tokenizer).load_adapter(tmp_path)
    record = json.loads((tmp_path / "rerank" / "listwise.json").read_text())
    (tmp_path / "rerank" / "listwise.json").write_text(json.dumps({**record, "model": "pip:other"}))
    with pytest.raises(CheckpointError, match="not listwise with"):
        LLMReranker(RerankConfig(mode="listwise"), MODEL, tokenizer).load_adapter(tmp_path)
    (tmp_path / "rerank" / "listwise.safetensors").write_bytes(b"truncated")
    with pytest.raises(CheckpointError, match="unreadable reranker adapter"):
        LLMReranker(RerankConfig(mode="listwise"), MODEL, tokenizer).load_adapter(tmp_path)
