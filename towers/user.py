"""User tower: a decoder LLM reads the profile prompt; a pooled state is projected to ``D``.

Pooling is ``last`` (the state at the prompt's last token) or ``mean`` (the mean of the states over the
profile's item tokens, header excluded). Both are causal: the pooled state at position ``p`` depends only on
tokens ``<= p``, which lets training read one example per history position from a single forward pass.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from configs import UserTowerConfig
from errors import ConfigError
from towers.llm import apply_strategy, build_decoder


class UserHead(nn.Module):
    """LayerNorm + MLP (or linear) projection from LLM states ``(..., H)`` to unit vectors ``(..., D)``."""

    def __init__(self, hidden: int, dim: int, head_hidden: int):
        super().__init__()
        layers: list[nn.Module] = [nn.LayerNorm(hidden)]
        if head_hidden:
            layers += [nn.Linear(hidden, head_hidden), nn.GELU(), nn.Linear(head_hidden, dim)]
        else:
            layers.append(nn.Linear(hidden, dim))
        self.net = nn.Sequential(*layers)

    def forward(self, states: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.net(states), dim=-1)


class UserTower(nn.Module):
    """LLM backbone + projection head. ``encode_users`` returns ``(B, D)`` L2-normalised embeddings."""

    def __init__(self, cfg: UserTowerConfig, dim: int):
        super().__init__()
        if cfg.pooling not in ("last", "mean"):
            raise ConfigError(f"unknown user.pooling {cfg.pooling!r}; choose 'last' or 'mean'")
        self.cfg = cfg
        self.dim = dim
        llm = build_decoder(cfg)
        text_cfg = getattr(llm.config, "text_config", None) or llm.config
        self.hidden_size = int(text_cfg.hidden_size)
        if cfg.gradient_checkpointing:
            llm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        self.llm = apply_strategy(llm, cfg)
        self.head = UserHead(self.hidden_size, dim, cfg.head_hidden)

    def states(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, positions: torch.Tensor | None = None,
               content_start: int = 0) -> torch.Tensor:
        """Pooled LLM states at ``positions (B, P)`` -> ``(B, P, H)``; default: each row's last token, ``(B, H)``.

        ``content_start`` is where the items begin (after the prompt header); ``mean`` pooling averages the
        states from there up to each position.
        """
        h = self.llm(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state  # (B, T, H)
        if self.cfg.pooling == "mean":
            keep = attention_mask.clone()
            keep[:, :content_start] = 0
            keep = keep.unsqueeze(-1).to(h.dtype)  # (B, T, 1)
            h = (h * keep).cumsum(1) / keep.cumsum(1).clamp(min=1.0)  # running mean over item tokens
        if positions is None:
            last = attention_mask.sum(1) - 1  # (B,)
            return h[torch.arange(h.shape[0], device=h.device), last]  # (B, H)
        return torch.gather(h, 1, positions.unsqueeze(-1).expand(-1, -1, h.shape[-1]))  # (B, P, H)

    def encode_users(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, content_start: int = 0) -> torch.Tensor:
        """``(B, D)`` embeddings from right-padded profile prompts."""
        return self.head(self.states(input_ids, attention_mask, content_start=content_start))

    forward = encode_users
