"""Frozen encoders' features, computed once per training run instead of every step.

A frozen text or image backbone gives the same features every epoch, so training caches them for the
training items and the item tower reads ``text_features`` / ``image_features`` instead of raw inputs.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from data.items import ItemDataset, item_loader, to_device
from towers.feature_cache import text_features
from towers.progress import tqdm


@torch.inference_mode()
def frozen_features(model, dataset: ItemDataset, device, batch_size: int = 64, num_workers: int = 0,
                    rows: Sequence[int] | None = None, progress: bool = True) -> dict[str, torch.Tensor]:
    """Features of frozen encoders for items ``rows`` (default: all), keyed ``"<modality>_features"``.

    Images come with ``image_mask`` (``(N,)`` bool): an item without an image gets a zero feature row and a
    False mask, and a batch in which no item has an image costs no image forward pass at all.
    """
    item = model.item
    frozen = []
    if item.text is not None and not model.config.item.text.trainable:
        frozen.append("text")
    if item.image is not None and not model.config.item.image.trainable:
        frozen.append("image")
    if not frozen:
        return {}
    cached = None
    if "text" in frozen:  # every catalog item's text, once per catalog and encoder (see towers/feature_cache.py)
        all_text = text_features(model, dataset, device, batch_size, progress)
        cached = all_text if rows is None else all_text[torch.as_tensor(np.asarray(rows), dtype=torch.long)]
        frozen.remove("text")
    if not frozen:
        return {"text_features": cached}
    out: dict[str, list[torch.Tensor]] = {m: [] for m in frozen}
    masks: list[torch.Tensor] = []
    loader = item_loader(dataset.without("text", "audio"), rows, batch_size=batch_size, num_workers=num_workers)
    for batch in tqdm(loader, desc=f"caching frozen {'+'.join(frozen)} features", leave=False, disable=not progress):
        n = len(batch["row"])
        batch = to_device(batch, device)
        if "image" in frozen:
            if "pixels" in batch:  # collate leaves pixels out when no item of the batch has an image
                out["image"].append(item.image(batch["pixels"]).float().cpu())
                masks.append(batch["image_mask"].cpu())
            else:
                out["image"].append(torch.zeros(n, item.image.feature_dim))
                masks.append(torch.zeros(n, dtype=torch.bool))
    feats = {f"{m}_features": torch.cat(v) for m, v in out.items()}
    if cached is not None:
        feats["text_features"] = cached
    if "image" in frozen:
        feats["image_mask"] = torch.cat(masks)
    return feats
