"""User tower: a decoder LLM reads the profile prompt; its last-token state is projected to ``D``."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from configs import UserTowerConfig
from towers.hub import resolve_model


def pad_batch(sequences: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad token id lists to ``(B, T)`` ids and attention mask."""
    t = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), t), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), t), dtype=torch.long)
    for i, s in enumerate(sequences):
        ids[i, : len(s)] = torch.as_tensor(s, dtype=torch.long)
        mask[i, : len(s)] = 1
    return ids, mask


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
        from transformers import AutoModel

        self.cfg = cfg
        self.dim = dim
        self.llm = AutoModel.from_pretrained(resolve_model(cfg.model))
        text_cfg = getattr(self.llm.config, "text_config", None) or self.llm.config
        self.hidden_size = int(text_cfg.hidden_size)
        if not cfg.trainable:
            self.llm.requires_grad_(False)
        self.head = UserHead(self.hidden_size, dim, cfg.head_hidden)

    def states(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
               positions: torch.Tensor | None = None) -> torch.Tensor:
        """LLM final hidden states at ``positions (B, P)``; default: each row's last real token, ``(B, H)``."""
        h = self.llm(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state  # (B, T, H)
        if positions is None:
            last = attention_mask.sum(1) - 1  # (B,)
            return h[torch.arange(h.shape[0], device=h.device), last]  # (B, H)
        return torch.gather(h, 1, positions.unsqueeze(-1).expand(-1, -1, h.shape[-1]))  # (B, P, H)

    def encode_users(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """``(B, D)`` embeddings from right-padded profile prompts."""
        return self.head(self.states(input_ids, attention_mask))

    forward = encode_users
