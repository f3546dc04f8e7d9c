"""Fusion of any subset of modality features into one L2-normalised item embedding."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from errors import CatalogError, ConfigError


class ModalityFusion(nn.Module):
    """Projects each modality to ``D`` and combines the present ones with masked, learned gates.

    ``features[m]`` is ``(B, F_m)`` and ``masks[m]`` is ``(B,)`` bool (True = present). Absent modalities get
    zero weight; an item needs at least one present modality. ``mode="mean"`` weights present ones equally.
    """

    def __init__(self, feature_dims: dict[str, int], dim: int, mode: str = "gated"):
        super().__init__()
        if mode not in ("gated", "mean"):
            raise ConfigError(f"unknown fusion {mode!r}; choose 'gated' or 'mean'")
        if not feature_dims:
            raise ConfigError("the item tower needs at least one modality: enable item.text, item.image, item.audio or item.id_embedding")
        self.mode = mode
        self.modalities = list(feature_dims)
        self.proj = nn.ModuleDict({
            m: nn.Sequential(nn.LayerNorm(d), nn.Linear(d, dim)) for m, d in feature_dims.items()
        })
        self.gate = nn.ModuleDict({m: nn.Linear(dim, 1) for m in feature_dims})

    def forward(self, features: dict[str, torch.Tensor], masks: dict[str, torch.Tensor]) -> torch.Tensor:
        projected, logits, present = [], [], []
        for m in self.modalities:
            if m not in features:
                continue
            z = self.proj[m](features[m])  # (B, D)
            projected.append(z)
            logits.append(self.gate[m](z).squeeze(-1) if self.mode == "gated" else torch.zeros_like(z[:, 0]))
            present.append(masks[m].to(torch.bool))
        if not projected:
            raise ValueError(f"no modality features given; expected some of {self.modalities}")
        z = torch.stack(projected, 1)  # (B, M, D)
        present_mask = torch.stack(present, 1)  # (B, M)
        empty = ~present_mask.any(1)
        if empty.any():
            raise CatalogError(f"{int(empty.sum())} item(s) in the batch have no modality present")
        w = torch.stack(logits, 1).masked_fill(~present_mask, float("-inf")).softmax(1)  # (B, M)
        return F.normalize((w.unsqueeze(-1) * z).sum(1), dim=-1)  # (B, D)
