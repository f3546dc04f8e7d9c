"""Item inputs: the text an item shows its encoder, a Dataset that decodes one catalog item per index, and the
collate that batches them.

Decoding (tokenising text, PIL for images, soundfile for audio) happens here, in DataLoader workers, so towers
only ever see tensors.
"""

from __future__ import annotations

import copy
import functools
import logging
from collections.abc import Sequence

import numpy as np
import polars as pl
import torch
from torch.utils.data import DataLoader, Dataset, Subset

from configs import Config
from data.catalog import Catalog
from data.media import load_audio, load_image, pad_waveforms

logger = logging.getLogger(__name__)


def pad_batch(sequences: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad token id lists to ``(B, T)`` ids and attention mask."""
    t = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), t), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), t), dtype=torch.long)
    for i, s in enumerate(sequences):
        ids[i, : len(s)] = torch.as_tensor(s, dtype=torch.long)
        mask[i, : len(s)] = 1
    return ids, mask


def item_text(items: pl.DataFrame, max_chars: int) -> list[str]:
    """Text fed to the item text encoder: title, genres and (truncated) description."""
    rows = items.select(
        "title",
        pl.col("genres") if "genres" in items.columns else pl.lit(None, dtype=pl.Utf8).alias("genres"),
        "text",
    ).iter_rows()
    out = []
    for title, genres, text in rows:
        parts = [title or ""]
        if genres:
            parts.append(f"Genres: {genres}.")
        if text and max_chars > 0:
            parts.append(text[:max_chars])
        out.append(" ".join(parts).strip())
    return out


class ItemDataset(Dataset):
    """Decoded inputs of catalog items. ``id_rows[i]`` is item ``i``'s row in the id table (-1 = none)."""

    def __init__(self, catalog: Catalog, config: Config, text_tokenizer=None, image_norm=None,
                 id_rows: np.ndarray | None = None):
        self.catalog = catalog
        self.cfg = config.item
        self.texts = item_text(catalog.items, config.data.item_text_chars)
        self.tokenizer = text_tokenizer
        self.image_norm = image_norm  # (mean, std) of the image encoder
        self.image_paths = catalog.items["image_path"].to_list()
        self.audio_paths = catalog.items["audio_path"].to_list()
        self.id_rows = id_rows if id_rows is not None else np.full(len(self.texts), -1, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.texts)

    def without(self, *modalities: str) -> ItemDataset:
        """The same items with some modalities left undecoded (e.g. text whose features are cached)."""
        other = copy.copy(self)
        other.skip = frozenset(self.skip) | set(modalities)
        return other

    skip: frozenset = frozenset()  # modalities not decoded (their features come from elsewhere)

    def __getitem__(self, i: int) -> dict:
        out: dict = {"row": i, "id_index": int(self.id_rows[i])}
        if self.cfg.text.enabled and "text" not in self.skip:
            enc = self.tokenizer(self.texts[i], truncation=True, max_length=self.cfg.text.max_length)
            out["text_input_ids"] = enc["input_ids"]
        if self.cfg.image.enabled and "image" not in self.skip:
            path = self.catalog.media_path(self.image_paths[i])
            out["pixels"] = None if path is None else load_image(path, self.cfg.image.image_size, *self.image_norm)
        if self.cfg.audio.enabled and "audio" not in self.skip:
            path = self.catalog.media_path(self.audio_paths[i])
            out["waveform"] = None if path is None else load_audio(
                path, self.cfg.audio.sample_rate, self.cfg.audio.max_seconds)
        return out


def collate_items(items: Sequence[dict], pad_id: int = 0, image_size: int = 0) -> dict[str, torch.Tensor]:
    """Batch decoded items; a missing modality becomes zeros with its mask False."""
    batch: dict[str, torch.Tensor] = {
        "row": torch.tensor([it["row"] for it in items], dtype=torch.long),
        "id_index": torch.tensor([it["id_index"] for it in items], dtype=torch.long),
    }
    if "text_input_ids" in items[0]:
        batch["text_input_ids"], batch["text_attention_mask"] = pad_batch([it["text_input_ids"] for it in items], pad_id)
    # A modality absent from every item of the batch is left out entirely (the tower treats it as missing).
    if "pixels" in items[0] and any(it["pixels"] is not None for it in items):
        present = [it["pixels"] is not None for it in items]
        blank = torch.zeros(3, image_size, image_size)
        batch["pixels"] = torch.stack([it["pixels"] if ok else blank for it, ok in zip(items, present)])
        batch["image_mask"] = torch.tensor(present)
    if "waveform" in items[0] and any(it["waveform"] is not None for it in items):
        present = [it["waveform"] is not None for it in items]
        waves = [it["waveform"] if ok else torch.zeros(1) for it, ok in zip(items, present)]
        batch["waveforms"], batch["waveform_lengths"] = pad_waveforms(waves)
        batch["audio_mask"] = torch.tensor(present)
    return batch


def item_loader(dataset: ItemDataset, rows: Sequence[int] | None = None, batch_size: int = 64,
                num_workers: int = 0, text_only: bool = False) -> DataLoader:
    """DataLoader over ``rows`` (default: all items) in order; ``text_only`` decodes no media.

    It draws nothing from the global random state (its worker seed comes from a generator of its own), so
    encoding a catalog's features on a cache miss leaves a seeded training exactly where a cache hit does.
    """
    if text_only:
        dataset = dataset.without("image", "audio")
    pad = dataset.tokenizer.pad_token_id if dataset.tokenizer is not None else 0
    size = dataset.cfg.image.image_size
    subset = dataset if rows is None else Subset(dataset, list(rows))
    return DataLoader(subset, batch_size=batch_size, shuffle=False, num_workers=num_workers,
                      collate_fn=functools.partial(collate_items, pad_id=pad, image_size=size),
                      generator=torch.Generator().manual_seed(0))


def to_device(batch: dict[str, torch.Tensor], device) -> dict[str, torch.Tensor]:
    """Move every tensor of a batch to ``device``."""
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}
