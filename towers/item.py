"""Item tower: text, image, audio and (optionally) a learned id vector, fused into one embedding."""

from __future__ import annotations

import torch
from torch import nn

from configs import ItemTowerConfig
from errors import CheckpointError, ConfigError
from towers.audio import AudioEncoder
from towers.fusion import ModalityFusion
from towers.image import ImageEncoder
from towers.text import TextEncoder

MODALITIES = ("text", "image", "audio", "id")


class ItemTower(nn.Module):
    """Encodes a batch of decoded item inputs to ``(B, D)`` L2-normalised embeddings.

    Batch keys (any subset; a modality whose inputs are absent is treated as missing for the whole batch):

    - ``text_input_ids`` / ``text_attention_mask`` ``(B, L)``, or cached ``text_features`` ``(B, H)``;
    - ``pixels`` ``(B, 3, S, S)`` with ``image_mask`` ``(B,)``, or cached ``image_features``;
    - ``waveforms`` ``(B, N)``, ``waveform_lengths`` ``(B,)`` with ``audio_mask`` ``(B,)``;
    - ``id_index`` ``(B,)``: row of the id table, ``-1`` for items unseen in training (cold start).
    """

    def __init__(self, cfg: ItemTowerConfig, dim: int, num_ids: int = 0):
        super().__init__()
        self.cfg = cfg
        self.dim = dim
        dims: dict[str, int] = {}
        self.text = TextEncoder(cfg.text) if cfg.text.enabled else None
        self.image = ImageEncoder(cfg.image) if cfg.image.enabled else None
        self.audio = AudioEncoder(cfg.audio) if cfg.audio.enabled else None
        for name in ("text", "image", "audio"):
            encoder = getattr(self, name)
            if encoder is not None:
                dims[name] = encoder.feature_dim
        if cfg.id_embedding == "auto":
            raise ConfigError("item.id_embedding 'auto' is resolved by configs.Config (from data.protocol)")
        self.num_ids = num_ids if cfg.id_embedding else 0
        if self.num_ids:
            self.ids = nn.Embedding(num_ids, dim)
            nn.init.normal_(self.ids.weight, std=0.02)
            dims["id"] = dim
        self.fusion = ModalityFusion(dims, dim, cfg.fusion)

    def modality_features(self, batch: dict[str, torch.Tensor]) -> tuple[dict, dict]:
        """Run the encoders whose inputs are in ``batch``; returns ``(features, masks)`` keyed by modality."""
        feats: dict[str, torch.Tensor] = {}
        masks: dict[str, torch.Tensor] = {}
        if self.text is not None:
            if "text_features" in batch:
                feats["text"] = batch["text_features"]
            elif "text_input_ids" in batch:
                feats["text"] = self.text(batch["text_input_ids"], batch["text_attention_mask"])
            if "text" in feats:
                masks["text"] = batch.get("text_mask", torch.ones(len(feats["text"]), dtype=torch.bool,
                                                                  device=feats["text"].device))
        if self.image is not None:
            if "image_features" in batch:
                feats["image"] = batch["image_features"]
            elif "pixels" in batch:
                feats["image"] = self.image(batch["pixels"])
            if "image" in feats:
                masks["image"] = batch["image_mask"]
        if self.audio is not None and "waveforms" in batch and bool(batch["audio_mask"].any()):
            # Only items that have audio go through the encoder: placeholder rows of the others would
            # otherwise count in its batch-norm statistics (and cost a forward pass).
            mask = batch["audio_mask"]
            rows = mask.nonzero().squeeze(1)
            present = self.audio(batch["waveforms"].index_select(0, rows), batch["waveform_lengths"].index_select(0, rows))
            feats["audio"] = present.new_zeros(len(mask), present.shape[1]).index_copy(0, rows, present)
            masks["audio"] = mask
        if self.num_ids and "id_index" in batch:
            idx = batch["id_index"]
            if int(idx.max()) >= self.num_ids:
                raise ValueError(f"id_index {int(idx.max())} out of range for {self.num_ids} id rows")
            feats["id"] = self.ids(idx.clamp(min=0))
            masks["id"] = idx >= 0
        for name, f in feats.items():
            expected = self.fusion.proj[name][0].normalized_shape[0]
            if f.shape[-1] != expected:
                raise CheckpointError(f"{name} features have dimension {f.shape[-1]}, the item tower expects {expected}")
        return feats, masks

    def encode_items(self, batch: dict[str, torch.Tensor], modality_dropout: float = 0.0) -> torch.Tensor:
        """``(B, D)`` L2-normalised item embeddings. ``modality_dropout`` hides present modalities at random
        (never all of them), so the tower learns to serve items that lack some modality."""
        feats, masks = self.modality_features(batch)
        if modality_dropout > 0 and len(masks) > 1:
            present = torch.stack([masks[m] for m in masks], 1)  # (B, M)
            keep = torch.rand(present.shape, device=present.device) >= modality_dropout
            kept = present & keep
            fallback = ~kept.any(1)  # rows that would lose everything keep their original mask
            kept[fallback] = present[fallback]
            masks = {m: kept[:, i] for i, m in enumerate(masks)}
        return self.fusion(feats, masks)

    forward = encode_items
