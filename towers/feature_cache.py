"""A disk cache of frozen encoders' features, so a catalog's texts and images are encoded once, not in every
training (MiniLM on ML-100K's titles and overviews takes over a minute on a 2-core CPU, EfficientNet-Lite0 on
its 1,682 posters about as long).

The key is a hash of the encoder's weights, its config and the inputs of every catalog item, in order (texts;
each image file's bytes): any change re-encodes. Files live in ``$TOWERREC_CACHE/features/`` and are written
atomically, so a crash never leaves a half file that a later run would trust.
"""

from __future__ import annotations

import hashlib
import json
import logging

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from data.atomic import write_file
from data.items import ItemDataset, item_loader, to_device
from towers.factory import hash_weights
from towers.hub import cache_dir
from towers.progress import tqdm

logger = logging.getLogger(__name__)


@torch.inference_mode()
def text_features(model, dataset: ItemDataset, device, batch_size: int = 64, progress: bool = True) -> torch.Tensor:
    """``(N, H)`` features of every item's text from the model's (frozen) text encoder, cached on disk."""
    encoder = model.item.text
    path = _cache_path(model, dataset)
    feats = cached_text_features(model, dataset, path)
    if feats is not None:
        return feats
    out = []
    loader = item_loader(dataset, batch_size=batch_size, text_only=True)
    for batch in tqdm(loader, desc="encoding item texts", leave=False, disable=not progress):
        batch = to_device(batch, device)
        out.append(encoder(batch["text_input_ids"], batch["text_attention_mask"]).float().cpu())
    feats = torch.cat(out) if out else torch.zeros(0, encoder.feature_dim)
    write_file(path, lambda tmp: save_file({"features": feats.contiguous()}, str(tmp)))
    return feats


def cached_text_features(model, dataset: ItemDataset, path=None) -> torch.Tensor | None:
    """The cached ``(N, H)`` text features of every item of ``dataset``, or None when not cached (nothing is
    computed: a caller embedding a catalog in resumable chunks encodes the missing texts chunk by chunk)."""
    path = path or _cache_path(model, dataset)
    if not path.is_file():
        return None
    try:
        feats = load_file(str(path))["features"]
    except (SafetensorError, OSError, KeyError):
        logger.warning("ignoring an unreadable feature cache file %s", path)
        return None
    if feats.shape[0] != len(dataset):
        return None
    logger.info("text features of %d items from the cache (%s)", len(dataset), path.name)
    return feats


def _cache_path(model, dataset: ItemDataset):
    """Cache file of the text features of ``dataset``'s items for the model's text encoder."""
    key = hashlib.sha256(json.dumps({
        "weights": hash_weights(model.item.text).hexdigest(), "model": model.config.item.text.model,
        "max_length": model.config.item.text.max_length, "texts": dataset.texts,
    }).encode()).hexdigest()[:32]
    return cache_dir() / "features" / f"text-{key}.safetensors"


@torch.inference_mode()
def image_features(model, dataset: ItemDataset, device, batch_size: int = 64,
                   progress: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """``(N, E)`` features of every item's image from the model's frozen image encoder and ``(N,)`` whether the
    item has one (an item without an image gets a zero row), cached on disk."""
    encoder = model.item.image
    path = _image_cache_path(model, dataset)
    if path.is_file():
        try:
            saved = load_file(str(path))
            if saved["features"].shape[0] == len(dataset):
                logger.info("image features of %d items from the cache (%s)", len(dataset), path.name)
                return saved["features"], saved["mask"].bool()
        except (SafetensorError, OSError, KeyError):
            logger.warning("ignoring an unreadable feature cache file %s", path)
    feats, masks = [], []
    loader = item_loader(dataset.without("text", "audio"), batch_size=batch_size)
    for batch in tqdm(loader, desc="encoding item images", leave=False, disable=not progress):
        n = len(batch["row"])
        if "pixels" in batch:  # collate leaves pixels out when no item of the batch has an image
            feats.append(encoder(batch["pixels"].to(device)).float().cpu())
            masks.append(batch["image_mask"].cpu())
        else:
            feats.append(torch.zeros(n, encoder.feature_dim))
            masks.append(torch.zeros(n, dtype=torch.bool))
    feats = torch.cat(feats) if feats else torch.zeros(0, encoder.feature_dim)
    mask = torch.cat(masks) if masks else torch.zeros(0, dtype=torch.bool)
    feats = feats * mask[:, None]  # a placeholder image's features never leak
    write_file(path, lambda tmp: save_file({"features": feats.contiguous(), "mask": mask.to(torch.uint8)}, str(tmp)))
    return feats, mask


def _image_cache_path(model, dataset: ItemDataset):
    """Cache file of the image features of ``dataset``'s items for the model's image encoder."""
    files = []
    for rel in dataset.image_paths:
        path = dataset.catalog.media_path(rel)
        files.append(None if path is None else hashlib.sha256(path.read_bytes()).hexdigest())
    cfg = model.config.item.image
    key = hashlib.sha256(json.dumps({
        "weights": hash_weights(model.item.image).hexdigest(), "arch": cfg.arch, "pretrained": cfg.pretrained,
        "image_size": cfg.image_size, "files": files,
    }).encode()).hexdigest()[:32]
    return cache_dir() / "features" / f"image-{key}.safetensors"


def text_encoder_is_cacheable(model) -> bool:
    """A frozen text encoder gives the same features every time: those are worth caching."""
    return model.item.text is not None and not model.config.item.text.trainable
