"""LLM reranker: pointwise yes/no log-odds of each candidate, given the profile prompt.

The profile prefix is run once per user and its KV cache is shared by all candidates, so a candidate costs
only its own question tokens. The final score mixes the retrieval score and the LLM log-odds after
z-scoring each within the user's candidate list: ``z(retrieval) + weight * z(llm)``.
"""

from __future__ import annotations

import inspect
import logging

import torch
from torch import nn

from configs import RerankConfig
from data.items import pad_batch
from errors import ModelLoadError
from towers.hub import load_pretrained

logger = logging.getLogger(__name__)

QUESTION = "\nCandidate: {title}\nWould this user enjoy the candidate next? Answer:"


class LLMReranker(nn.Module):
    """Scores candidates with ``log p(" Yes") - log p(" No")`` after the profile and a candidate question."""

    def __init__(self, cfg: RerankConfig, model_ref: str, tokenizer):
        super().__init__()
        from transformers import AutoModelForCausalLM

        self.cfg = cfg
        self.tokenizer = tokenizer
        self.lm = load_pretrained(AutoModelForCausalLM, model_ref)
        self.lm.requires_grad_(False)
        self.lm.eval()
        self.yes_id = self._single_token(" Yes")
        self.no_id = self._single_token(" No")

    def _single_token(self, word: str) -> int:
        ids = self.tokenizer(word, add_special_tokens=False)["input_ids"]
        return int(ids[-1])  # the answer's first distinguishing token

    def question_ids(self, title: str) -> list[int]:
        """Token ids of the candidate question that follows the profile (no special tokens)."""
        return list(self.tokenizer(QUESTION.format(title=title), add_special_tokens=False)["input_ids"])

    @torch.inference_mode()
    def log_odds(self, profile_ids: list[int], candidate_titles: list[str]) -> torch.Tensor:
        """``(C,)`` yes/no log-odds for each candidate title after one profile prompt.

        ``log p(Yes) - log p(No)`` is the difference of the two logits (the softmax normaliser cancels), so
        only two rows of the output embedding are used: the full vocabulary projection (262k rows for Gemma)
        would cost more than the transformer itself.
        """
        from transformers import DynamicCache

        device = next(self.lm.parameters()).device
        body = self.lm.get_decoder()
        kwarg = cache_kwarg(body)
        head = self.lm.get_output_embeddings().weight[[self.yes_id, self.no_id]]  # (2, H)
        cap = getattr(self.lm.config, "final_logit_softcapping", None)
        prefix = torch.as_tensor([profile_ids], device=device)
        # The model fills the cache object it is given in place, so the output's cache attribute (named
        # differently across transformers versions) is never read. The config gives Gemma's sliding-window
        # layers the same cache layout the model would build for itself.
        prefix_cache = DynamicCache(config=self.lm.config)
        body(input_ids=prefix, use_cache=True, **{kwarg: prefix_cache})
        scores = []
        for start in range(0, len(candidate_titles), self.cfg.batch_size):
            titles = candidate_titles[start:start + self.cfg.batch_size]
            ids, mask = pad_batch([self.question_ids(t) for t in titles], self.tokenizer.pad_token_id)
            ids, mask = ids.to(device), mask.to(device)
            cache = _repeat_cache(prefix_cache, len(titles))
            full_mask = torch.cat([torch.ones(len(titles), prefix.shape[1], dtype=mask.dtype, device=device), mask], 1)
            positions = prefix.shape[1] + torch.arange(ids.shape[1], device=device).expand(len(titles), -1)
            h = body(input_ids=ids, attention_mask=full_mask, position_ids=positions, use_cache=True,
                     **{kwarg: cache}).last_hidden_state  # (C, S, H)
            last = h[torch.arange(len(titles), device=device), mask.sum(1) - 1]  # (C, H)
            logits = last.float() @ head.float().T  # (C, 2)
            if cap:
                logits = cap * torch.tanh(logits / cap)
            scores.append(logits[:, 0] - logits[:, 1])
        return torch.cat(scores).cpu()

    def combine(self, retrieval: torch.Tensor, llm: torch.Tensor) -> torch.Tensor:
        """Final candidate scores: z-scored retrieval plus ``weight`` times z-scored LLM log-odds."""
        return _zscore(retrieval) + self.cfg.weight * _zscore(llm)


def cache_kwarg(decoder: nn.Module) -> str:
    """Name of the KV-cache argument of ``decoder.forward``: ``cache`` (transformers 5.24 and later) or
    ``past_key_values`` (5.0 to 5.23).

    Detected from the signature rather than from the version number: a model that does not know the name it is
    given swallows it into ``**kwargs`` and silently runs without the cache, which would score every candidate
    question without its profile.
    """
    params = inspect.signature(decoder.forward).parameters
    for name in ("cache", "past_key_values"):
        if name in params:
            return name
    raise ModelLoadError(
        f"{type(decoder).__name__}.forward takes neither cache= nor past_key_values=; the reranker needs a "
        "decoder with a KV cache"
    )


def _zscore(x: torch.Tensor) -> torch.Tensor:
    x = x.float()
    return (x - x.mean()) / (x.std() + 1e-6) if x.numel() > 1 else x * 0


def _repeat_cache(cache, n: int):
    """A copy of a batch-1 KV cache repeated ``n`` times along the batch (the original stays untouched)."""
    import copy

    out = copy.deepcopy(cache)
    out.batch_repeat_interleave(n)
    return out
