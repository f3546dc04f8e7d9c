"""Item-sequence cross-encoder reranker (``rerank.mode: sequence``): the user tower's own LLM layers read the
history and every candidate together, and a learned head scores each candidate.

The retriever scores a candidate by a dot product with one user vector, so the history is read without knowing
what it is compared with. Here each candidate is one more position after the history (its item-tower input, as
the user tower reads items, plus a learned marker), and the attention mask lets it attend to the whole history
and to itself, never to the other candidates::

    history:    h1 h2 h3 .. hn          (causal among themselves, as in the user tower)
    candidates: c1 c2 .. cN             (each: h1..hn and itself, all at position n)

so one forward pass per user scores all its candidates, each as if it were the only one: a candidate's score
does not depend on which other candidates are in the list or in what order (no position bias to undo). Every
decoder layer attends from the candidate to the history (target-aware, like DIN's attention, but through the
pretrained LLM's layers) before ``head`` reads the candidate's final state.

It starts from the trained run's user tower: its decoder (LoRA merged in) gets new LoRA adapters through peft,
and the head's last layer starts at zero, so before fine-tuning every score is 0 and the reranked list is the
retriever's. It only exists fine-tuned (``towerrec train-rerank --mode sequence``), trained on the retriever's
own top-N for training users. The adapter is tied to the user tower it was trained from: a retrained run refuses
it (the fingerprint of the user tower's weights is saved with it).
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn

from configs import RerankConfig
from data.rundir import RunDir
from errors import CheckpointError, ConfigError, QueryError
from rerank.llm import fuse, lora_settings, read_adapter, wrap_lora, write_adapter

logger = logging.getLogger(__name__)

HEAD_HIDDEN = 256


class SequenceReranker(nn.Module):
    """Scores candidates (index-table rows) after a history (rows, oldest first) with the user tower's LLM.

    ``user``: a trained :class:`towers.sequence.ItemSequenceUserTower` (copied; the original is not changed).
    ``vectors``: ``(N, D)`` item embeddings in index-table row order; ``id_rows``: ``(N,)`` rows of the user
    tower's own input table (-1: none) or None; ``titles``: ``(N, H)`` title embeddings or None, as the
    recommender feeds the user tower.
    """

    def __init__(self, cfg: RerankConfig, user: nn.Module, vectors: np.ndarray, id_rows: np.ndarray | None = None,
                 titles: torch.Tensor | None = None):
        super().__init__()
        if getattr(user, "profile", None) is not None:
            raise ConfigError("rerank.mode=sequence does not read the user.profile_prefix position; use listwise or "
                              "pointwise for this run")
        self.cfg = cfg
        self.max_len = int(user.cfg.max_len)
        self.fingerprint = tower_fingerprint(user)
        # The token embeddings some towers keep beside them (user.item_titles) are shared, not copied.
        shared = getattr(user, "_token_embeddings", None)
        self.user = copy.deepcopy(user, memo={id(shared): shared} if shared is not None else None)
        llm = self.user.llm
        if hasattr(llm, "merge_and_unload"):  # the tower's own LoRA becomes part of the base weights
            llm = llm.merge_and_unload()
        self.user.llm = llm
        self.user.requires_grad_(False)
        self.hidden_size = int(self.user.hidden_size)
        self.vectors = torch.tensor(np.asarray(vectors, dtype=np.float32))  # a copy: the served array is read-only
        self.id_rows = None if id_rows is None else torch.as_tensor(np.asarray(id_rows, dtype=np.int64))
        self.titles = titles
        self.marker = nn.Parameter(torch.zeros(self.hidden_size))  # added to every candidate's input
        self.head = nn.Sequential(nn.Linear(self.hidden_size, HEAD_HIDDEN), nn.GELU(), nn.Linear(HEAD_HIDDEN, 1))
        nn.init.zeros_(self.head[2].weight)
        nn.init.zeros_(self.head[2].bias)
        self.weight = cfg.weight
        self.adapter: dict | None = None
        self.trained: dict | None = None
        self.history = None  # not a text prompt: rows are read directly

    # -- inputs ----------------------------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return self.marker.device

    def _inputs(self, rows: torch.Tensor) -> torch.Tensor:
        """``(..., H)`` decoder inputs of index-table rows, exactly as the user tower builds them."""
        flat = rows.reshape(-1).cpu()
        item = self.vectors[flat].to(self.device)
        ids = self.id_rows[flat].to(self.device) if self.id_rows is not None else None
        x = self.user.inputs(item.unsqueeze(0), None if ids is None else ids.unsqueeze(0))[0]
        x = self.user._to_input_scale(self.user.in_proj(x))
        if self.titles is not None:
            x = x + self.titles[flat.to(self.titles.device)].to(self.device, x.dtype)
        return x.reshape(*rows.shape, -1)

    def batch(self, histories: Sequence[Sequence[int]], candidates: Sequence[Sequence[int]]):
        """Inputs ``(B, T + C, H)``, the additive attention mask ``(B, 1, L, L)``, position ids and ``T``."""
        if len(histories) != len(candidates):
            raise QueryError(f"{len(histories)} histories for {len(candidates)} candidate lists")
        hist = [list(h)[-self.max_len:] for h in histories]
        for u, (h, c) in enumerate(zip(hist, candidates)):
            if not h:
                raise QueryError(f"sequence reranking: history {u} is empty")
            if not len(c):
                raise QueryError(f"sequence reranking: candidate list {u} is empty")
        t = max(len(h) for h in hist)  # candidates start after the longest history
        b, length = len(hist), t + max(len(c) for c in candidates)
        rows = torch.zeros(b, length, dtype=torch.long)
        allowed = torch.zeros(b, length, length, dtype=torch.bool)
        pos = torch.zeros(b, length, dtype=torch.long)
        is_cand = torch.zeros(b, length, dtype=torch.bool)
        for u, (h, cands) in enumerate(zip(hist, candidates)):
            n, k = len(h), len(cands)
            rows[u, :n] = torch.as_tensor(h, dtype=torch.long)
            rows[u, t:t + k] = torch.as_tensor(list(cands), dtype=torch.long)
            allowed[u, :n, :n] = torch.ones(n, n, dtype=torch.bool).tril()
            allowed[u, t:t + k, :n] = True
            pos[u, :n] = torch.arange(n)
            pos[u, t:t + k] = n
            is_cand[u, t:t + k] = True
        allowed |= torch.eye(length, dtype=torch.bool)  # a candidate sees itself; padding only itself (no NaN)
        x = self._inputs(rows)
        # The marker is added as it is (not rescaled like an item: at zero that rescaling has an unbounded gradient)
        x = x + is_cand.to(self.device).unsqueeze(-1) * self.marker.to(x.dtype)
        mask = torch.zeros(b, 1, length, length, dtype=x.dtype)
        mask = mask.masked_fill(~allowed.unsqueeze(1), torch.finfo(x.dtype).min)
        return x, mask.to(self.device), pos.to(self.device), t

    # -- scoring ---------------------------------------------------------------------------------------------
    def forward(self, histories: Sequence[Sequence[int]], candidates: Sequence[Sequence[int]]) -> torch.Tensor:
        """``(B, C)`` candidate scores (right-padded lists: columns past a list's length are meaningless)."""
        x, mask, pos, t = self.batch(histories, candidates)
        x = self.user.drop(x)
        h = self.user.llm(inputs_embeds=x, attention_mask=mask, position_ids=pos, use_cache=False).last_hidden_state
        z = (h[:, t:].float() - self.user.state_mean) / self.user.state_scale
        return self.head(z).squeeze(-1)

    @torch.inference_mode()
    def score_rows(self, histories: Sequence[Sequence[int]], candidates: Sequence[Sequence[int]]) -> list[torch.Tensor]:
        """Per user, the ``(C_u,)`` scores of its candidates (``rerank.batch_size`` users per forward pass)."""
        out: list[torch.Tensor] = []
        bs = max(1, self.cfg.batch_size)
        for start in range(0, len(histories), bs):
            s = self(histories[start:start + bs], candidates[start:start + bs]).cpu()
            out += [s[i, : len(c)].clone() for i, c in enumerate(candidates[start:start + bs])]
        return out

    def combine(self, retrieval: torch.Tensor, llm: torch.Tensor, weight: float | None = None) -> torch.Tensor:
        return fuse(retrieval, llm, self.weight if weight is None else weight)

    # -- adapters --------------------------------------------------------------------------------------------
    def lora_settings(self) -> dict:
        return lora_settings(self.cfg, self.user.llm, len(self.user.llm.layers))

    def add_lora(self, settings: dict | None = None) -> None:
        """New peft LoRA adapters on the (merged) decoder; they, the marker and the head are what train."""
        if self.adapter is not None:
            raise CheckpointError("this reranker already has a LoRA adapter")
        settings = settings or self.lora_settings()
        self.user.llm = wrap_lora(self.user.llm, settings)
        self.adapter = dict(settings)

    def adapter_state(self) -> dict[str, torch.Tensor]:
        """The trained weights (copies): the LoRA tensors as peft names them, the marker and the head."""
        from peft import get_peft_model_state_dict

        if self.adapter is None:
            raise CheckpointError("this reranker has no LoRA adapter")
        state = {f"lora.{k}": v for k, v in get_peft_model_state_dict(self.user.llm).items()}
        state["marker"] = self.marker
        state.update({f"head.{k}": v for k, v in self.head.state_dict().items()})
        return {k: v.detach().cpu().clone().contiguous() for k, v in state.items()}

    def load_adapter_state(self, state: dict[str, torch.Tensor]) -> None:
        """Put weights from :meth:`adapter_state` back; refuses missing or unexpected keys and shape mismatches."""
        from peft import set_peft_model_state_dict

        expected = self.adapter_state()
        if set(state) != set(expected):
            raise CheckpointError(f"sequence reranker adapter does not match its settings (missing "
                                  f"{sorted(set(expected) - set(state))[:3]}, unexpected "
                                  f"{sorted(set(state) - set(expected))[:3]})")
        bad = [k for k in state if state[k].shape != expected[k].shape]
        if bad:
            raise CheckpointError(f"sequence reranker adapter: shape mismatch in {bad[:3]}")
        set_peft_model_state_dict(self.user.llm, {k[5:]: v for k, v in state.items() if k.startswith("lora.")})
        with torch.no_grad():
            self.marker.copy_(state["marker"])
            self.head.load_state_dict({k[5:]: v for k, v in state.items() if k.startswith("head.")})

    def save_adapter(self, run_dir: str | Path, meta: dict) -> Path:
        """Write ``run_dir/rerank/sequence.safetensors`` and its settings (JSON), each atomically."""
        record = {"mode": "sequence", "user_tower": self.fingerprint, "lora": self.adapter, "weight": self.weight,
                  **meta}
        return write_adapter(run_dir, "sequence", self.adapter_state(), record)

    def load_adapter(self, run_dir: str | Path) -> bool:
        """Load the run's fine-tuned sequence reranker (False when there is none). One trained from another user
        tower (the run was retrained since) or an unreadable one is a :class:`CheckpointError`."""
        found = read_adapter(run_dir, "sequence")
        if found is None:
            return False
        weights, record, state = found
        if record.get("mode") != "sequence" or record.get("user_tower") != self.fingerprint:
            raise CheckpointError(f"{weights}: trained from another user tower than {RunDir(run_dir).path}'s "
                                  "(the run was retrained since); rerun train-rerank --mode sequence")
        self.add_lora(record["lora"])
        self.load_adapter_state(state)
        self.eval()
        self.weight = float(record["weight"])
        self.trained = record
        logger.info("reranker: sequence adapter from %s (fusion weight %.3g)", weights, self.weight)
        return True


def tower_fingerprint(user: nn.Module) -> str:
    """sha256 over the user tower's config and weights: what a sequence reranker adapter was trained from."""
    from towers.factory import hash_weights

    h = hashlib.sha256(json.dumps(dataclasses.asdict(user.cfg), sort_keys=True, default=str).encode())
    return hash_weights(user, h).hexdigest()


__all__ = ["SequenceReranker", "tower_fingerprint"]
