"""LLMReranker on the tiny random decoder: the shared KV prefix is exact, and the score combination."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from torch import nn

from configs import RerankConfig, load_config
from data.profiles import ProfileBuilder
from errors import ModelLoadError
from towers.hub import load_tokenizer
from towers.rerank import LLMReranker, _zscore, cache_kwarg

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
