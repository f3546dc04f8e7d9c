"""Text encoder: a transformers encoder (MiniLM by default) with attention-masked mean pooling."""

from __future__ import annotations

import torch
from torch import nn

from configs import TextEncoderConfig
from towers.hub import load_pretrained


class TextEncoder(nn.Module):
    """Maps token ids to one feature vector per text, shape ``(B, H)``.

    The projection to the shared space lives in the fusion module, so a frozen backbone's features can be
    cached and fed to the fusion directly.
    """

    def __init__(self, cfg: TextEncoderConfig):
        super().__init__()
        from transformers import AutoModel

        self.cfg = cfg
        self.backbone = load_pretrained(AutoModel, cfg.model)
        self.feature_dim = int(self.backbone.config.hidden_size)
        if not cfg.trainable:
            self.backbone.requires_grad_(False)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        out = self.backbone(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state  # (B, L, H)
        mask = attention_mask.unsqueeze(-1).to(out.dtype)  # (B, L, 1)
        return (out * mask).sum(1) / mask.sum(1).clamp(min=1.0)  # (B, H)
