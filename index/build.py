"""Embed a catalog with a run's item tower and write a new FAISS index version (a full :mod:`index.reindex`)."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch

from data.catalog import Catalog
from data.items import item_loader, to_device
from data.rundir import RunDir
from index.reindex import CHUNK_SIZE, KEEP_VERSIONS, ReindexResult, reindex
from towers.factory import TwoTower, make_item_dataset
from towers.feature_cache import text_encoder_is_cacheable, text_features
from towers.progress import tqdm

logger = logging.getLogger(__name__)


@torch.inference_mode()
def embed_items(model: TwoTower, catalog: Catalog, id_rows: np.ndarray, device, batch_size: int = 64,
                num_workers: int = 0, progress: bool = True) -> np.ndarray:
    """``(N, D)`` float32 embeddings of every catalog item, in catalog order.

    ``id_rows[i]`` is catalog item ``i``'s row in the item tower's id table (``-1``: no id vector, the item
    is embedded from its content alone).
    """
    dataset = make_item_dataset(catalog, model, id_rows)
    texts = None
    if text_encoder_is_cacheable(model):  # frozen text encoder: features from the cache that training filled
        texts = text_features(model, dataset, device, batch_size, progress)
        dataset = dataset.without("text")
    loader = item_loader(dataset, batch_size=batch_size, num_workers=num_workers)
    out = []
    for batch in tqdm(loader, desc="embedding items", disable=not progress, unit="batch"):
        rows = batch.pop("row")
        if texts is not None:
            batch["text_features"] = texts[rows]
        out.append(model.item.encode_items(to_device(batch, device)).float().cpu().numpy())
    return np.concatenate(out) if out else np.zeros((0, model.config.dim), dtype=np.float32)


def build_index(run_dir: str | Path, catalog_dir: str | Path | None = None, factory: str | None = None,
                batch_size: int | None = None, num_workers: int = 0, device: str = "auto",
                progress: bool = True, keep_versions: int = KEEP_VERSIONS, chunk_size: int = CHUNK_SIZE) -> Path:
    """Embed every item of the catalog and write a new live index version; returns its folder.

    The catalog is ``catalog_dir``, else the one the live version was built from, else (no index yet) the
    run's training catalog, hash-checked (see :func:`index.reindex.choose_catalog`). Items that were not in
    training get no id vector (cold start) and are embedded from their content. Items of the run's training
    catalog that are not in the catalog stay as retired rows (never recommended; a history holding them still
    embeds). The work is chunked and resumable, and older versions are pruned: see
    :func:`index.reindex.reindex`, which this calls with ``full=True`` (``reindex`` embeds only what changed).
    :func:`full_reindex` is the same and returns the whole :class:`index.reindex.ReindexResult`.
    """
    return full_reindex(run_dir, catalog_dir, factory, batch_size, num_workers, device, progress, keep_versions,
                        chunk_size).version


def full_reindex(run_dir: str | Path, catalog_dir: str | Path | None = None, factory: str | None = None,
                 batch_size: int | None = None, num_workers: int = 0, device: str = "auto",
                 progress: bool = True, keep_versions: int = KEEP_VERSIONS,
                 chunk_size: int = CHUNK_SIZE) -> ReindexResult:
    """:func:`build_index`, returning what the reindex did (which catalog, and why; counts; timings).

    ``factory`` defaults to the config's ``index.factory`` (``reindex`` keeps the live version's); an empty
    string is refused, never replaced by the default.
    """
    config = RunDir(run_dir).require().read_config()
    return reindex(run_dir, catalog_dir, full=True, factory=config.index.factory if factory is None else factory,
                   chunk_size=chunk_size, keep_versions=keep_versions, batch_size=batch_size,
                   num_workers=num_workers, device=device, progress=progress)
