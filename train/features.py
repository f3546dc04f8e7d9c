"""Frozen encoders' features, computed once per catalog instead of every step.

A frozen text or image backbone gives the same features every epoch, so training reads them from the disk
cache (:mod:`towers.feature_cache`) for the training items, and the item tower reads ``text_features`` /
``image_features`` instead of raw inputs.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from data.items import ItemDataset
from towers.feature_cache import image_features, text_features


def frozen_features(model, dataset: ItemDataset, device, batch_size: int = 64,
                    rows: Sequence[int] | None = None, progress: bool = True) -> dict[str, torch.Tensor]:
    """Features of frozen encoders for items ``rows`` (default: all), keyed ``"<modality>_features"``.

    Images come with ``image_mask`` (``(N,)`` bool): an item without an image gets a zero feature row and a
    False mask. Both are read from (or written to) the disk cache of every catalog item's features.
    """
    take = slice(None) if rows is None else torch.as_tensor(np.asarray(rows), dtype=torch.long)
    out = {}
    if model.item.text is not None and not model.config.item.text.trainable:
        out["text_features"] = text_features(model, dataset, device, batch_size, progress)[take]
    if model.item.image is not None and not model.config.item.image.trainable:
        feats, mask = image_features(model, dataset, device, batch_size, progress)
        out["image_features"], out["image_mask"] = feats[take], mask[take]
    return out
