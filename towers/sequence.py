"""Item-sequence user tower (HLLM style): LLM decoder layers read a history as a sequence of item embeddings.

Each history item is one position: its embedding (the item tower's, a learned table's, or both) is projected
to the LLM's hidden size and passed through ``inputs_embeds``, so the token embeddings and the LM head are
never used (and are dropped). Attention is causal, so one pass over a history gives, at every position ``p``,
a state that has seen items ``<= p`` only: training reads all of them at once (the state after item ``p`` is
trained to retrieve item ``p + 1``, as in SASRec), serving reads the last.

How the LLM itself learns (``user.strategy``): ``frozen``, ``top_k`` (only its top layers), ``lora`` (peft
adapters) or ``full``. ``user.init: random`` builds the same code on a small randomly initialised decoder:
the SASRec-equivalent baseline that every result is compared with.

``user.profile_prefix`` puts one more position before the items: the frozen LLM's text-profile state (the mean
state over a profile prompt, as the ``text`` input reads it) of the history *older* than the ``max_len`` items
read, standardised and projected like an item. Older items only: every position may see it without seeing its
own target. A history with nothing older gets a learned vector there.
"""

from __future__ import annotations

from dataclasses import replace

import torch
from torch import nn

from configs import UserTowerConfig
from data.items import pad_batch
from errors import ConfigError
from towers.llm import apply_strategy, build_decoder
from towers.user import UserHead


class ProfileEncoder(nn.Module):
    """The frozen LLM (``user.prefix_layer`` layers) that reads profile prompts into one mean state each."""

    def __init__(self, cfg: UserTowerConfig):
        super().__init__()
        self.llm = build_decoder(replace(cfg, layer=cfg.prefix_layer))
        self.llm.requires_grad_(False)
        self.llm.eval()
        text_cfg = getattr(self.llm.config, "text_config", None) or self.llm.config
        self.hidden_size = int(text_cfg.hidden_size)

    def train(self, mode: bool = True) -> ProfileEncoder:
        return super().train(False)  # frozen: never in training mode (no dropout)

    @torch.no_grad()
    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, content_start: int) -> torch.Tensor:
        """``(B, H')`` mean states over each right-padded prompt's tokens after ``content_start``."""
        h = self.llm(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state
        keep = attention_mask.clone()
        keep[:, :content_start] = 0
        keep = keep.unsqueeze(-1).to(h.dtype)
        return ((h * keep).sum(1) / keep.sum(1).clamp(min=1.0)).float()


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
        self.profile = None
        if cfg.profile_prefix:
            if cfg.init != "pretrained":
                raise ConfigError("user.profile_prefix needs user.init=pretrained (a text-profile state to read)")
            self.profile = ProfileEncoder(cfg)
            self.prefix_proj = nn.Linear(self.profile.hidden_size, self.hidden_size)
            self.prefix_none = nn.Parameter(torch.randn(self.hidden_size) * 0.02)  # no older history
            # Standardisation of the profile states (set by calibrate_prefix, saved with the weights).
            self.register_buffer("prefix_mean", torch.zeros(self.profile.hidden_size))
            self.register_buffer("prefix_scale", torch.ones(self.profile.hidden_size))

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

    def _to_input_scale(self, x: torch.Tensor) -> torch.Tensor:
        if self.input_rms is None:
            return x
        return x * (self.input_rms * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + 1e-6)).to(x.dtype)

    def prefix_inputs(self, prefix: torch.Tensor | None, batch: int) -> torch.Tensor:
        """``(B, 1, H)`` prefix positions from profile states ``(B, H')``, NaN rows for no older history."""
        if prefix is None or prefix.shape != (batch, self.profile.hidden_size):
            got = None if prefix is None else tuple(prefix.shape)
            raise ValueError(f"user.profile_prefix: expected profile states ({batch}, {self.profile.hidden_size}) "
                             f"(NaN rows: no older history), got {got}")
        present = ~torch.isnan(prefix[:, :1])  # (B, 1)
        z = (torch.nan_to_num(prefix) - self.prefix_mean) / self.prefix_scale
        x = self._to_input_scale(self.prefix_proj(z.to(self.prefix_proj.weight.dtype)))
        return torch.where(present, x, self._to_input_scale(self.prefix_none).expand_as(x)).unsqueeze(1)

    def states(self, item_emb: torch.Tensor, mask: torch.Tensor, id_rows: torch.Tensor | None = None,
               titles: torch.Tensor | None = None, prefix: torch.Tensor | None = None) -> torch.Tensor:
        """LLM states ``(B, T, H)`` after each history position (right-padded, ``mask`` 1 on real items).

        ``titles (B, T, H)``: the items' title embeddings (see :meth:`title_embeddings`), added to the inputs.
        ``prefix (B, H')``: with ``user.profile_prefix``, the profile states of the older histories
        (:meth:`profile_states`; NaN rows where there is none); they are read first and not returned.
        """
        if item_emb.dim() != 3 or item_emb.shape[-1] != self.dim or mask.shape != item_emb.shape[:2]:
            raise ValueError(f"expected items (B, T, {self.dim}) and mask (B, T), got {tuple(item_emb.shape)}, "
                             f"{tuple(mask.shape)}")
        x = self._to_input_scale(self.in_proj(self.inputs(item_emb, id_rows)))  # (B, T, H)
        if titles is not None:
            x = x + titles.to(x.dtype)
        mask = mask.long()
        if self.profile is not None:
            x = torch.cat([self.prefix_inputs(prefix, len(x)).to(x.dtype), x], 1)
            mask = torch.cat([mask.new_ones(len(mask), 1), mask], 1)
        x = self.drop(x)
        h = self.llm(inputs_embeds=x, attention_mask=mask, use_cache=False).last_hidden_state
        return h[:, 1:] if self.profile is not None else h

    def profile_states(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                       content_start: int) -> torch.Tensor:
        """``(B, H')`` frozen text-profile states of right-padded profile prompts (``user.profile_prefix``)."""
        if self.profile is None:
            raise ConfigError("profile states need user.profile_prefix=true")
        return self.profile(input_ids, attention_mask, content_start)

    @torch.no_grad()
    def calibrate_prefix(self, states: torch.Tensor) -> None:
        """Set the profile states' standardisation from ``(n, H')`` training prefixes (NaN rows skipped)."""
        states = states[~torch.isnan(states[:, 0])].float()
        if len(states) < 2:
            return  # too few older histories: leave the identity (the learned "none" vector does the work)
        sd = states.std(0)
        self.prefix_mean.copy_(states.mean(0))
        self.prefix_scale.copy_(sd.clamp(min=1e-3 * float(sd.mean()) + 1e-8))

    def project(self, states: torch.Tensor) -> torch.Tensor:
        """``(..., D)`` unit user vectors from LLM states ``(..., H)``: standardised, then the head."""
        return self.head((states - self.state_mean) / self.state_scale)

    @property
    def calibrated(self) -> bool:
        """Whether the state standardisation was set (by :meth:`calibrate`, or loaded with trained weights)."""
        return bool(self.state_mean.any() or (self.state_scale != 1).any())

    @torch.no_grad()
    def calibrate(self, item_emb: torch.Tensor, mask: torch.Tensor, id_rows: torch.Tensor | None = None,
                  titles: torch.Tensor | None = None, prefix: torch.Tensor | None = None) -> None:
        """Set the state standardisation from the (untrained) tower's states over a sample of histories.

        Deterministic for a given sample (dropout is off), so every DDP process computes the same statistics.
        """
        was_training = self.training
        self.eval()
        h = self.states(item_emb, mask, id_rows, titles, prefix).float()[mask.bool()]  # (n, H) real positions
        if len(h) < 2:
            raise ValueError(f"calibration needs at least 2 history positions, got {len(h)}")
        sd = h.std(0)
        self.state_mean.copy_(h.mean(0))
        self.state_scale.copy_(sd.clamp(min=1e-3 * float(sd.mean()) + 1e-8))
        self.train(was_training)

    def encode_sequence(self, item_emb: torch.Tensor, mask: torch.Tensor, id_rows: torch.Tensor | None = None,
                        titles: torch.Tensor | None = None, prefix: torch.Tensor | None = None) -> torch.Tensor:
        """``(B, T, D)`` user embeddings after every position."""
        return self.project(self.states(item_emb, mask, id_rows, titles, prefix))

    def encode_users(self, item_emb: torch.Tensor, mask: torch.Tensor, id_rows: torch.Tensor | None = None,
                     titles: torch.Tensor | None = None, prefix: torch.Tensor | None = None) -> torch.Tensor:
        """``(B, D)`` user embeddings after each history's last item (right-padded)."""
        h = self.states(item_emb, mask, id_rows, titles, prefix)
        last = mask.long().sum(1) - 1  # (B,)
        return self.project(h[torch.arange(h.shape[0], device=h.device), last])

    forward = encode_users


class ProfilePrefixes:
    """Prefix profile states (``user.profile_prefix``) of older histories, computed once per distinct history.

    ``builder`` is a :class:`data.profiles.ProfileBuilder` over the same item indices the histories use (split
    indices in training, index-table rows in serving); ``pad_id`` is its tokenizer's padding id.
    """

    def __init__(self, model, builder, pad_id: int, batch_size: int = 8):
        self.user, self.builder, self.pad_id, self.batch_size = model.user, builder, pad_id, batch_size
        self.cache: dict[tuple[int, ...], torch.Tensor] = {}

    def __call__(self, older) -> torch.Tensor:
        """``(B, H')`` states of histories (dense indices, oldest first); NaN rows for empty ones."""
        keys = [tuple(int(i) for i in h) for h in older]
        todo = sorted({k for k in keys if k and k not in self.cache}, key=len)
        device = next(self.user.parameters()).device
        for start in range(0, len(todo), self.batch_size):
            chunk = todo[start:start + self.batch_size]
            ids, mask = pad_batch([self.builder.build(k).input_ids for k in chunk], self.pad_id)
            states = self.user.profile_states(ids.to(device), mask.to(device), len(self.builder.header_ids)).cpu()
            self.cache.update(zip(chunk, states))
        nan = torch.full((self.user.profile.hidden_size,), float("nan"))
        return torch.stack([self.cache[k] if k else nan for k in keys]).to(device) if keys else \
            torch.zeros((0, self.user.profile.hidden_size), device=device)


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


__all__ = ["ItemSequenceUserTower", "ProfileEncoder", "ProfilePrefixes", "title_table", "token_rms"]
