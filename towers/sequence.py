"""Item-sequence user tower (HLLM style): LLM decoder layers read a history as a sequence of item embeddings.

Each history item is one position: its embedding (the item tower's, a learned table's, or both) is projected
to the LLM's hidden size and passed through ``inputs_embeds``, so the token embeddings and the LM head are
never used (and are dropped). Attention is causal, so one pass over a history gives, at every position ``p``,
a state that has seen items ``<= p`` only: training reads all of them at once (the state after item ``p`` is
trained to retrieve item ``p + 1``, as in SASRec), serving reads the last.

How the LLM itself learns (``user.strategy``): ``frozen``, ``top_k`` (only its top layers), ``lora`` (peft
adapters) or ``full``. ``user.init: random`` builds the same code on a small randomly initialised decoder:
the SASRec-equivalent baseline that every result is compared with.
"""

from __future__ import annotations

import torch
from torch import nn

from configs import UserTowerConfig
from errors import ConfigError
from towers.llm import apply_strategy, build_decoder
from towers.user import UserHead


class ItemSequenceUserTower(nn.Module):
    """``encode_sequence(items (B, T, D), mask (B, T))`` -> ``(B, T, D)`` L2-normalised states, one per position.

    ``num_ids`` rows of an own input table (``input_table`` "own" or "both"); row ``-1`` (a cold item) falls
    back to the item tower's embedding.
    """

    def __init__(self, cfg: UserTowerConfig, dim: int, num_ids: int = 0):
        super().__init__()
        self.cfg = cfg
        self.dim = dim
        if cfg.item_titles and cfg.init != "pretrained":
            raise ConfigError("user.item_titles needs user.init=pretrained (the LLM's own token embeddings)")
        llm = build_decoder(cfg, cfg.dropout)
        # Pretrained layers were trained on token embeddings of a given scale (Gemma multiplies its by
        # sqrt(hidden)); projected item vectors are RMS-normalised to that scale, or the first layers' outputs
        # would drown them. A random decoder has no such expectation: its inputs are left as projected.
        self.input_rms = token_rms(llm) if cfg.init == "pretrained" else None
        # The token embeddings (Gemma's: 168M parameters) are not part of the tower: with item_titles they stay
        # outside the module tree (frozen, never saved) to embed titles; otherwise they are dropped.
        object.__setattr__(self, "_token_embeddings", llm.embed_tokens if cfg.item_titles else None)
        llm.embed_tokens = None
        self.hidden_size = int(llm.config.hidden_size)
        if cfg.gradient_checkpointing:
            llm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        self.llm = apply_strategy(llm, cfg)
        self.table = None
        if cfg.input_table in ("own", "both") and num_ids:
            self.table = nn.Embedding(num_ids, dim)
            nn.init.normal_(self.table.weight, std=0.02)
        self.in_proj = nn.Linear(dim, self.hidden_size)
        self.drop = nn.Dropout(cfg.dropout)
        self.head = UserHead(self.hidden_size, dim, cfg.head_hidden)
        # Per-dimension standardisation of the LLM's states before the head, set by :meth:`calibrate`.
        # Pretrained decoders carry a few "massive activation" dimensions (in Gemma-3's 4th layer one dimension
        # averages ~2,000 where the median is ~2) that hold >90% of a state's energy and barely depend on the
        # input, so a LayerNorm over raw states leaves every user almost the same vector.
        self.register_buffer("state_mean", torch.zeros(self.hidden_size))
        self.register_buffer("state_scale", torch.ones(self.hidden_size))

    def inputs(self, item_emb: torch.Tensor, id_rows: torch.Tensor | None = None) -> torch.Tensor:
        """Input vectors ``(B, T, D)`` of history items from their item-tower embeddings and id-table rows."""
        if self.table is None or id_rows is None:
            return item_emb
        own = self.table(id_rows.clamp(min=0))  # (B, T, D)
        known = (id_rows >= 0).unsqueeze(-1)
        if self.cfg.input_table == "own":
            return torch.where(known, own, item_emb)
        return item_emb + own * known

    @torch.no_grad()
    def title_embeddings(self, token_ids: list[list[int]]) -> torch.Tensor:
        """``(N, H)``: each title's mean token embedding in the LLM's own input space (``user.item_titles``)."""
        if self._token_embeddings is None:
            raise ConfigError("title embeddings need user.item_titles=true")
        emb = self._token_embeddings
        device = next(self.parameters()).device
        emb.to(device)
        out = torch.zeros(len(token_ids), self.hidden_size, device=device)
        for start in range(0, len(token_ids), 1024):
            chunk = token_ids[start:start + 1024]
            width = max(1, max(len(t) for t in chunk))
            ids = torch.zeros(len(chunk), width, dtype=torch.long, device=device)
            mask = torch.zeros(len(chunk), width, device=device)
            for i, t in enumerate(chunk):
                ids[i, : len(t)] = torch.as_tensor(t, dtype=torch.long)
                mask[i, : len(t)] = 1
            e = emb(ids).float() * mask.unsqueeze(-1)  # (n, L, H)
            out[start:start + len(chunk)] = e.sum(1) / mask.sum(1, keepdim=True).clamp(min=1)
        return out

    def states(self, item_emb: torch.Tensor, mask: torch.Tensor, id_rows: torch.Tensor | None = None,
               titles: torch.Tensor | None = None) -> torch.Tensor:
        """LLM states ``(B, T, H)`` after each history position (right-padded, ``mask`` 1 on real items).

        ``titles (B, T, H)``: the items' title embeddings (see :meth:`title_embeddings`), added to the inputs.
        """
        if item_emb.dim() != 3 or item_emb.shape[-1] != self.dim or mask.shape != item_emb.shape[:2]:
            raise ValueError(f"expected items (B, T, {self.dim}) and mask (B, T), got {tuple(item_emb.shape)}, "
                             f"{tuple(mask.shape)}")
        x = self.in_proj(self.inputs(item_emb, id_rows))  # (B, T, H)
        if self.input_rms is not None:
            x = x * (self.input_rms * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + 1e-6)).to(x.dtype)
        if titles is not None:
            x = x + titles.to(x.dtype)
        x = self.drop(x)
        return self.llm(inputs_embeds=x, attention_mask=mask.long(), use_cache=False).last_hidden_state

    def project(self, states: torch.Tensor) -> torch.Tensor:
        """``(..., D)`` unit user vectors from LLM states ``(..., H)``: standardised, then the head."""
        return self.head((states - self.state_mean) / self.state_scale)

    @property
    def calibrated(self) -> bool:
        """Whether the state standardisation was set (by :meth:`calibrate`, or loaded with trained weights)."""
        return bool(self.state_mean.any() or (self.state_scale != 1).any())

    @torch.no_grad()
    def calibrate(self, item_emb: torch.Tensor, mask: torch.Tensor, id_rows: torch.Tensor | None = None,
                  titles: torch.Tensor | None = None) -> None:
        """Set the state standardisation from the (untrained) tower's states over a sample of histories.

        Deterministic for a given sample (dropout is off), so every DDP process computes the same statistics.
        """
        was_training = self.training
        self.eval()
        h = self.states(item_emb, mask, id_rows, titles).float()[mask.bool()]  # (n, H) real positions
        if len(h) < 2:
            raise ValueError(f"calibration needs at least 2 history positions, got {len(h)}")
        sd = h.std(0)
        self.state_mean.copy_(h.mean(0))
        self.state_scale.copy_(sd.clamp(min=1e-3 * float(sd.mean()) + 1e-8))
        self.train(was_training)

    def encode_sequence(self, item_emb: torch.Tensor, mask: torch.Tensor, id_rows: torch.Tensor | None = None,
                        titles: torch.Tensor | None = None) -> torch.Tensor:
        """``(B, T, D)`` user embeddings after every position."""
        return self.project(self.states(item_emb, mask, id_rows, titles))

    def encode_users(self, item_emb: torch.Tensor, mask: torch.Tensor, id_rows: torch.Tensor | None = None,
                     titles: torch.Tensor | None = None) -> torch.Tensor:
        """``(B, D)`` user embeddings after each history's last item (right-padded)."""
        h = self.states(item_emb, mask, id_rows, titles)
        last = mask.long().sum(1) - 1  # (B,)
        return self.project(h[torch.arange(h.shape[0], device=h.device), last])

    forward = encode_users


@torch.no_grad()
def token_rms(llm: nn.Module) -> float:
    """Root mean square of the LLM's input token embeddings (its scale factor included, as Gemma's is)."""
    emb = llm.embed_tokens
    ids = torch.arange(0, emb.num_embeddings, max(1, emb.num_embeddings // 4096))
    return float(emb(ids).float().pow(2).mean().sqrt())


def title_table(model, titles: list[str]) -> torch.Tensor | None:
    """``(N, H)`` title embeddings of ``titles`` for an item-sequence tower with ``user.item_titles``; else None."""
    user = model.user
    if not getattr(user, "cfg", None) or not getattr(user.cfg, "item_titles", False):
        return None
    from towers.hub import load_tokenizer

    tokenizer = load_tokenizer(model.config.user.model)
    ids = [list(tokenizer(t or "", add_special_tokens=False)["input_ids"])[:32] for t in titles]
    return user.title_embeddings(ids)


__all__ = ["ItemSequenceUserTower", "title_table", "token_rms"]
