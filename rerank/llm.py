"""LLM reranker: a listwise verbalizer (LlamaRec) or pointwise yes/no log-odds, zero-shot or LoRA-tuned.

Two modes (``rerank.mode``), both reading the user's history as the profile prompt (titles, most recent kept
within ``rerank.history_tokens``):

- ``listwise``: the candidates are lettered in one prompt and a candidate's score is the logit of its letter at
  the answer position. One forward pass per user (per permutation), no generation, and only the letters' rows
  of the output embedding are used (Gemma's full 262k-row projection would cost more than the transformer)::

      <bos>Items this user engaged with, oldest first:
      - Babe (1995)
      - Heat (1995)
      Candidates:
      (A) Fargo (1996)
      (B) Contact (1997)
      Which candidate will this user engage with next? Answer: (

- ``pointwise``: ``log p(" Yes") - log p(" No")`` after the history and one question per candidate. The history
  is run once per user and its KV cache is shared by all candidates, so a candidate costs only its question.

The final score mixes the retrieval score and the LLM score after z-scoring each within the user's candidate
list: ``z(retrieval) + weight * z(llm)``. A fine-tuned adapter (``train/rerank.py``, saved in the run's
``rerank/`` folder) brings the weight tuned on validation users.
"""

from __future__ import annotations

import dataclasses
import hashlib
import inspect
import json
import logging
import warnings
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from configs import LETTER_LABELS, DataConfig, RerankConfig
from data.items import pad_batch
from data.profiles import ProfileBuilder
from data.rundir import RunDir
from errors import CheckpointError, ModelLoadError, QueryError
from towers.hub import load_pretrained, load_tokenizer

logger = logging.getLogger(__name__)

QUESTION = "\nCandidate: {title}\nWould this user enjoy the candidate next? Answer:"
LIST_HEADER = "Candidates:\n"
LIST_QUESTION = "Which candidate will this user engage with next? Answer:"
LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"[:LETTER_LABELS]


class LLMReranker(nn.Module):
    """Scores a user's candidates with a causal LM, by letter logits (listwise) or yes/no log-odds (pointwise).

    ``tokenizer`` must be the model's own; ``None`` loads it from ``model_ref``.
    """

    def __init__(self, cfg: RerankConfig, model_ref: str, tokenizer=None):
        super().__init__()
        from transformers import AutoModelForCausalLM

        self.cfg = cfg
        self.model_ref = model_ref
        self.tokenizer = tokenizer if tokenizer is not None else load_tokenizer(model_ref)
        self.lm = load_pretrained(AutoModelForCausalLM, model_ref)
        self.lm.requires_grad_(False)
        self.lm.eval()
        self.weight = cfg.weight  # fusion weight; a loaded adapter replaces it with its validation-tuned one
        self.adapter: dict | None = None  # settings of the LoRA adapter, once added or loaded
        self.trained: dict | None = None  # the record of a loaded fine-tuned adapter (its rerank/<mode>.json)
        self.history: ProfileBuilder | None = None  # the history prompt builder its owner attaches (history_builder)
        self.yes_id = self._single_token(" Yes")
        self.no_id = self._single_token(" No")
        # Listwise pieces, tokenised once. A candidate line is "(" + letter + ") title\n", and the prompt ends
        # with the same "(" so that the next token is the answer's letter, the very token the list used.
        self.open_ids = self._encode("(")
        self.letter_ids = [self._letter_token(letter) for letter in LETTERS]
        if len(set(self.letter_ids)) != len(self.letter_ids):
            raise ModelLoadError(f"the tokenizer of {model_ref!r} maps two candidate letters to one token")
        self.list_header_ids = self._encode(LIST_HEADER)
        self.list_question_ids = self._encode(LIST_QUESTION) + self.open_ids
        self._title_ids: dict[str, list[int]] = {}

    # -- tokens ----------------------------------------------------------------------------------------------
    def _encode(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def _single_token(self, word: str) -> int:
        ids = self._encode(word)
        return int(ids[-1])  # the answer's first distinguishing token

    def _letter_token(self, letter: str) -> int:
        """The one token that follows "(" for ``letter`` (a tokenizer that splits it cannot run listwise)."""
        ids = self._encode("(" + letter)
        if ids[: len(self.open_ids)] != self.open_ids or len(ids) != len(self.open_ids) + 1:
            raise ModelLoadError(f"the tokenizer of {self.model_ref!r} does not read '({letter}' as '(' then one "
                                 "letter token; listwise reranking needs single-token letters")
        return int(ids[-1])

    def question_ids(self, title: str) -> list[int]:
        """Token ids of the pointwise candidate question that follows the profile (no special tokens)."""
        return self._encode(QUESTION.format(title=title))

    def _candidate_line(self, title: str) -> list[int]:
        """``") title\\n"`` with the title cut to ``rerank.title_tokens`` tokens (cached per title)."""
        ids = self._title_ids.get(title)
        if ids is None:
            ids = self._encode(")") + self._encode(" " + title)[: self.cfg.title_tokens] + self._encode("\n")
            self._title_ids[title] = ids
        return ids

    def list_prompt(self, profile_ids: Sequence[int], titles: Sequence[str]) -> list[int]:
        """The listwise prompt: the profile, the candidates lettered in the given order, the question."""
        if not 0 < len(titles) <= LETTER_LABELS:
            raise QueryError(f"listwise reranking takes 1 to {LETTER_LABELS} candidates, got {len(titles)}")
        ids = list(profile_ids) + self.list_header_ids
        for letter_id, title in zip(self.letter_ids, titles):
            ids += self.open_ids + [letter_id] + self._candidate_line(title)
        return ids + self.list_question_ids

    # -- listwise --------------------------------------------------------------------------------------------
    def _head(self, token_ids: list[int]) -> torch.Tensor:
        return self.lm.get_output_embeddings().weight[token_ids]  # (V', H)

    def _logits(self, hidden: torch.Tensor, token_ids: list[int]) -> torch.Tensor:
        """``(B, V')`` logits of ``token_ids`` from ``(B, H)`` final hidden states (Gemma's soft-cap applied)."""
        logits = hidden.float() @ self._head(token_ids).float().T
        cap = getattr(self.lm.config, "final_logit_softcapping", None)
        return cap * torch.tanh(logits / cap) if cap else logits

    def letter_logits(self, prompts: list[list[int]]) -> torch.Tensor:
        """``(B, 26)`` logits of every letter at the last token of each listwise prompt (one padded batch).

        Differentiable (training calls it); inference wraps it in ``inference_mode``.
        """
        device = self.lm.get_output_embeddings().weight.device
        ids, mask = pad_batch(prompts, self.tokenizer.pad_token_id)  # right-padded: causal rows never see padding
        ids, mask = ids.to(device), mask.to(device)
        h = self.lm.get_decoder()(input_ids=ids, attention_mask=mask).last_hidden_state  # (B, T, H)
        last = h[torch.arange(len(prompts), device=device), mask.sum(1) - 1]  # (B, H)
        return self._logits(last, self.letter_ids)

    def permutations(self, n: int) -> list[torch.Tensor]:
        """``rerank.permutations`` candidate orders: the given order, then seeded shuffles (``perm[j]`` is the
        candidate shown with letter ``j``)."""
        g = torch.Generator().manual_seed(self.cfg.seed)
        return [torch.arange(n)] + [torch.randperm(n, generator=g) for _ in range(self.cfg.permutations - 1)]

    @torch.inference_mode()
    def listwise(self, profiles: Sequence[Sequence[int]], titles: Sequence[Sequence[str]]) -> list[torch.Tensor]:
        """Per user, ``(C,)`` letter logits of its candidates, averaged over the permutations.

        Each pass adds one constant to all its letters' logits, and every candidate appears once per pass, so the
        average ranks like an average of log-probabilities over the letters.
        """
        rows, owners = [], []
        for u, (profile, cands) in enumerate(zip(profiles, titles)):
            for perm in self.permutations(len(cands)):
                rows.append(self.list_prompt(profile, [cands[int(i)] for i in perm]))
                owners.append((u, perm))
        out = [torch.zeros(len(c)) for c in titles]
        for start in range(0, len(rows), self.cfg.batch_size):
            logits = self.letter_logits(rows[start:start + self.cfg.batch_size]).cpu()
            for r, (u, perm) in enumerate(owners[start:start + self.cfg.batch_size]):
                out[u][perm] += logits[r, : len(perm)]
        return [o / self.cfg.permutations for o in out]

    # -- pointwise -------------------------------------------------------------------------------------------
    def _pointwise(self, profile_ids: Sequence[int], titles: Sequence[str], batch_size: int) -> torch.Tensor:
        """``(C,)`` yes/no log-odds; the profile's KV cache is computed once and repeated for each batch.

        ``log p(Yes) - log p(No)`` is the difference of two logits (the softmax normaliser cancels), so only two
        rows of the output embedding are used.
        """
        from transformers import DynamicCache

        device = self.lm.get_output_embeddings().weight.device
        body = self.lm.get_decoder()
        kwarg = cache_kwarg(body)
        prefix = torch.as_tensor([list(profile_ids)], device=device)
        # The model fills the cache object it is given in place, so the output's cache attribute (named
        # differently across transformers versions) is never read. The config gives Gemma's sliding-window
        # layers the same cache layout the model would build for itself.
        prefix_cache = DynamicCache(config=self.lm.config)
        body(input_ids=prefix, use_cache=True, **{kwarg: prefix_cache})
        single = batch_size >= len(titles)
        scores = []
        for start in range(0, len(titles), batch_size):
            chunk = titles[start:start + batch_size]
            ids, mask = pad_batch([self.question_ids(t) for t in chunk], self.tokenizer.pad_token_id)
            ids, mask = ids.to(device), mask.to(device)
            if single:  # the prefix is not needed again: repeat it in place (differentiable, no copy)
                cache = prefix_cache
                cache.batch_repeat_interleave(len(chunk))
            else:
                cache = _repeat_cache(prefix_cache, len(chunk))
            full_mask = torch.cat([torch.ones(len(chunk), prefix.shape[1], dtype=mask.dtype, device=device), mask], 1)
            positions = prefix.shape[1] + torch.arange(ids.shape[1], device=device).expand(len(chunk), -1)
            h = body(input_ids=ids, attention_mask=full_mask, position_ids=positions, use_cache=True,
                     **{kwarg: cache}).last_hidden_state  # (C, S, H)
            last = h[torch.arange(len(chunk), device=device), mask.sum(1) - 1]  # (C, H)
            logits = self._logits(last, [self.yes_id, self.no_id])  # (C, 2)
            scores.append(logits[:, 0] - logits[:, 1])
        return torch.cat(scores)

    @torch.inference_mode()
    def log_odds(self, profile_ids: Sequence[int], candidate_titles: Sequence[str]) -> torch.Tensor:
        """``(C,)`` pointwise yes/no log-odds of each candidate title after one profile prompt."""
        return self._pointwise(profile_ids, candidate_titles, self.cfg.batch_size).cpu()

    def log_odds_train(self, profile_ids: Sequence[int], candidate_titles: Sequence[str]) -> torch.Tensor:
        """Differentiable :meth:`log_odds` (all candidates in one batch sharing the profile's cache)."""
        return self._pointwise(profile_ids, candidate_titles, len(candidate_titles))

    # -- either mode -----------------------------------------------------------------------------------------
    def score_batch(self, profiles: Sequence[Sequence[int]], titles: Sequence[Sequence[str]]) -> list[torch.Tensor]:
        """LLM scores of each user's candidates in the configured mode: one ``(C_u,)`` tensor per user."""
        if self.cfg.mode == "listwise":
            return self.listwise(profiles, titles)
        return [self.log_odds(p, t) for p, t in zip(profiles, titles)]

    def score(self, profile_ids: Sequence[int], titles: Sequence[str]) -> torch.Tensor:
        """LLM scores of one user's candidates in the configured mode, ``(C,)``."""
        return self.score_batch([profile_ids], [titles])[0]

    def combine(self, retrieval: torch.Tensor, llm: torch.Tensor, weight: float | None = None) -> torch.Tensor:
        """Final candidate scores: z-scored retrieval plus ``weight`` (default: this reranker's) times z-scored LLM."""
        return fuse(retrieval, llm, self.weight if weight is None else weight)

    # -- LoRA adapters ---------------------------------------------------------------------------------------
    def lora_settings(self) -> dict:
        """The adapter settings of ``rerank.lora_*`` (targets checked against the model's modules)."""
        return lora_settings(self.cfg, self.lm, self.lm.config.num_hidden_layers)

    def add_lora(self, settings: dict | None = None) -> None:
        """Wrap the LM with peft LoRA adapters (``settings`` as :meth:`lora_settings` gives); only they train."""
        if self.adapter is not None:
            raise CheckpointError("this reranker already has a LoRA adapter")
        settings = settings or self.lora_settings()
        self.lm = wrap_lora(self.lm, settings)
        self.adapter = dict(settings)

    def adapter_state(self) -> dict[str, torch.Tensor]:
        """The LoRA weights (copies), as peft names them."""
        from peft import get_peft_model_state_dict

        if self.adapter is None:
            raise CheckpointError("this reranker has no LoRA adapter")
        return {k: v.detach().cpu().clone().contiguous() for k, v in get_peft_model_state_dict(self.lm).items()}

    def load_adapter_state(self, state: dict[str, torch.Tensor]) -> None:
        """Put LoRA weights (from :meth:`adapter_state`) into the adapter; refuses missing or unexpected keys."""
        from peft import set_peft_model_state_dict

        expected = set(self.adapter_state())
        if set(state) != expected:
            raise CheckpointError(f"reranker adapter does not match its settings (missing "
                                  f"{sorted(expected - set(state))[:3]}, unexpected {sorted(set(state) - expected)[:3]})")
        set_peft_model_state_dict(self.lm, state)

    def save_adapter(self, run_dir: str | Path, meta: dict) -> Path:
        """Write the adapter into ``run_dir/rerank/<mode>.safetensors`` and its settings beside it (JSON)."""
        record = {"mode": self.cfg.mode, "model": self.model_ref, "lora": self.adapter, "weight": self.weight,
                  "history_tokens": self.cfg.history_tokens, "title_tokens": self.cfg.title_tokens, **meta}
        return write_adapter(run_dir, self.cfg.mode, self.adapter_state(), record)

    def load_adapter(self, run_dir: str | Path) -> bool:
        """Load ``run_dir``'s fine-tuned adapter for this mode, if there is one, with its fusion weight.

        Returns False (zero-shot) when the run has none; an adapter for another model, or an unreadable one, is a
        :class:`CheckpointError`.
        """
        found = read_adapter(run_dir, self.cfg.mode)
        if found is None:
            return False
        weights, record, state = found
        if record.get("model") != self.model_ref or record.get("mode") != self.cfg.mode:
            raise CheckpointError(f"{weights}: adapter for {record.get('mode')} reranking with model "
                                  f"{record.get('model')!r}, not {self.cfg.mode} with {self.model_ref!r}")
        self.add_lora(record["lora"])
        self.load_adapter_state(state)
        self.lm.eval()
        self.weight = float(record["weight"])
        # Serve with the prompt the adapter was trained on.
        self.cfg = dataclasses.replace(self.cfg, history_tokens=int(record["history_tokens"]),
                                       title_tokens=int(record["title_tokens"]))
        self._title_ids.clear()
        self.trained = record
        logger.info("reranker: %s adapter from %s (fusion weight %.3g)", self.cfg.mode, weights, self.weight)
        return True

    def base_model(self):
        """A context manager under which the LM runs without its adapter (used to write reasons)."""
        import contextlib

        disable = getattr(self.lm, "disable_adapter", None)
        return disable() if self.adapter is not None and disable is not None else contextlib.nullcontext()


def lora_settings(cfg: RerankConfig, model: nn.Module, layers: int) -> dict:
    """The adapter settings of ``rerank.lora_*`` for ``model`` (``layers`` decoder layers): its targets checked
    against the model's modules, ``rerank.lora_layers`` turned into the top layers' indices."""
    targets = [t.strip() for t in cfg.lora_targets.split(",") if t.strip()]
    names = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    missing = [t for t in targets if t not in names]
    if missing:
        raise QueryError(f"rerank.lora_targets: {missing} are not modules of {type(model).__name__}")
    if cfg.lora_layers > layers:
        raise QueryError(f"rerank.lora_layers={cfg.lora_layers} but the model has {layers} layers")
    top = list(range(layers - cfg.lora_layers, layers)) if cfg.lora_layers else None
    return {"rank": cfg.lora_rank, "alpha": cfg.lora_alpha, "dropout": cfg.lora_dropout, "targets": targets,
            "layers": top}


def wrap_lora(model: nn.Module, settings: dict) -> nn.Module:
    """``model`` wrapped with peft LoRA adapters as ``settings`` (from :func:`lora_settings`) say."""
    from peft import LoraConfig, get_peft_model

    lora = LoraConfig(r=settings["rank"], lora_alpha=settings["alpha"], lora_dropout=settings["dropout"],
                      target_modules=list(settings["targets"]), layers_to_transform=settings["layers"], bias="none")
    with warnings.catch_warnings():  # peft asks transformers a deprecated question; not the user's concern
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        return get_peft_model(model, lora)


def adapter_paths(run_dir: str | Path, mode: str) -> tuple[Path, Path]:
    """``(weights, settings)`` of a run's fine-tuned reranker for ``mode``."""
    folder = RunDir(run_dir).path / RunDir.RERANK
    return folder / f"{mode}.safetensors", folder / f"{mode}.json"


def write_adapter(run_dir: str | Path, mode: str, state: dict[str, torch.Tensor], record: dict) -> Path:
    """Write a fine-tuned reranker's weights (safetensors) and its record (JSON) for ``mode``, into the run only.

    Each file is replaced atomically, the weights first; the record holds the weights' sha256, so a record left
    from an earlier adapter (the process died between the two) is refused by :func:`read_adapter`, never served
    with weights it does not describe. A ``rerank`` that is a symbolic link or a file is refused (writing there
    would write outside the run, or replace what is not the run's).
    """
    from safetensors.torch import save

    from data.atomic import write_file, write_text

    weights, settings = adapter_paths(run_dir, mode)
    folder = weights.parent
    if folder.is_symlink() or (folder.exists() and not folder.is_dir()):
        raise CheckpointError(f"{folder}: is not a folder of the run (a file or a symbolic link); move it away")
    blob = save(state, metadata={"mode": mode})
    write_file(weights, lambda tmp: tmp.write_bytes(blob))
    write_text(settings, json.dumps({**record, "weights_sha256": hashlib.sha256(blob).hexdigest()}, indent=2))
    return weights


def read_adapter(run_dir: str | Path, mode: str) -> tuple[Path, dict, dict[str, torch.Tensor]] | None:
    """``(weights path, record, state)`` of the run's fine-tuned reranker for ``mode``; None when there is none,
    a :class:`CheckpointError` when it cannot be read or its record describes other weights."""
    from safetensors import SafetensorError
    from safetensors.torch import load

    weights, settings = adapter_paths(run_dir, mode)
    if not weights.is_file():
        return None
    try:
        blob = weights.read_bytes()
        record = json.loads(settings.read_text())
        state = load(blob)
    except (OSError, ValueError, SafetensorError) as err:
        raise CheckpointError(f"{weights}: unreadable reranker adapter ({err}); rerun train-rerank") from None
    want = record.get("weights_sha256") if isinstance(record, dict) else None
    if want is not None and want != hashlib.sha256(blob).hexdigest():
        raise CheckpointError(f"{settings}: describes other weights than {weights.name} (an interrupted "
                              "train-rerank or train-reasons); run it again")
    return weights, record, state


def history_builder(data: DataConfig, rerank: RerankConfig, titles: Sequence[str],
                    texts: Sequence[str | None] | None, tokenizer) -> ProfileBuilder:
    """The reranker's history prompt builder: the profile prompt's format and item cap, with the
    ``rerank.history_tokens`` budget (0 = the profile's own, ``data.profile_token_budget``); the most recent
    items are kept."""
    return ProfileBuilder(tokenizer, titles, texts, token_budget=rerank.history_tokens or data.profile_token_budget,
                          max_items=data.profile_max_items, text_chars=data.profile_text_chars)


def fuse(retrieval: torch.Tensor, llm: torch.Tensor, weight: float) -> torch.Tensor:
    """``z(retrieval) + weight * z(llm)``, each z-scored within the user's candidates."""
    return _zscore(retrieval) + weight * _zscore(llm)


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
