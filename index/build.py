"""Embed a catalog with a run's item tower and write a new FAISS index version."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np
import polars as pl
import torch
from tqdm.auto import tqdm

from data.catalog import Catalog, catalog_sha256, load_catalog
from data.ids import ItemSpace, faiss_ids
from data.items import item_loader, to_device
from data.rundir import RunDir
from index.store import Manifest, build_faiss, empty_index, write_version
from towers.device import resolve_device
from towers.factory import TwoTower, item_fingerprint, load_towers, make_item_dataset
from towers.feature_cache import text_encoder_is_cacheable, text_features

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
                progress: bool = True) -> Path:
    """Embed every item of the catalog (default: the run's, hash-checked) and write a new live index version.

    Items that were not in training get no id vector (cold start) and are embedded from their content.
    Returns the new version folder.
    """
    run = RunDir(run_dir).require()
    config = run.read_config()
    dev = resolve_device(device)
    if catalog_dir is not None:
        catalog, digest = load_catalog(catalog_dir), catalog_sha256(catalog_dir)
    else:  # hash-checked against the run's record, so that record is its hash
        catalog, digest = run.load_catalog(), run.catalog_ref()["sha256"]
    factory = factory or config.index.factory
    empty_index(factory, config.dim, catalog.items.height)  # a bad factory fails before the embedding work
    model = load_towers(run, dev)
    catalog_items = ItemSpace(catalog.items["item_id"].to_list(), "catalog")
    id_rows = catalog_items.to(run.read_id_table())
    t0 = time.time()
    vectors = embed_items(model, catalog, id_rows, dev, batch_size or config.item.text.batch_size,
                          num_workers, progress)
    logger.info("embedded %d items in %.1fs", len(vectors), time.time() - t0)
    ids = faiss_ids(catalog.items["item_id"])
    index = build_faiss(vectors, ids, factory, config.index.nprobe, config.index.ef_search)
    items = catalog.items.select("item_id", "title", "text").insert_column(0, pl.Series("faiss_id", ids))
    manifest = Manifest(
        fingerprint=item_fingerprint(model), dim=config.dim, metric="ip", count=len(vectors), factory=factory,
        created=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), catalog_sha256=digest,
    )
    return write_version(run.index_root, index, items, manifest, vectors=vectors)

