"""Embed a catalog with a run's item tower and write a new FAISS index version."""

from __future__ import annotations

import hashlib
import json
import logging
import time
from pathlib import Path

import numpy as np
import polars as pl
import torch
from tqdm.auto import tqdm

from index.store import Manifest, build_faiss, write_version
from towers.factory import TwoTower, item_fingerprint, load_config_from_run, load_towers
from train.data import Catalog, catalog_sha256, load_catalog
from train.items import item_loader, make_item_dataset, to_device
from train.loop import resolve_device

logger = logging.getLogger(__name__)


def faiss_ids(item_ids: pl.Series) -> np.ndarray:
    """Stable int64 FAISS ids: integer item ids are used as they are, strings get a 63-bit blake2b hash."""
    if item_ids.dtype.is_integer():
        return item_ids.cast(pl.Int64).to_numpy()
    out = np.array([int.from_bytes(hashlib.blake2b(str(x).encode(), digest_size=8).digest(), "little") >> 1
                    for x in item_ids.to_list()], dtype=np.int64)
    if len(np.unique(out)) != len(out):
        raise ValueError("item id hash collision; rename one of the colliding item ids")
    return out


def run_catalog(run_dir: Path) -> Path:
    """The catalog folder a run was trained on."""
    info = json.loads((run_dir / "catalog.json").read_text())
    return Path(info["path"])


@torch.inference_mode()
def embed_items(model: TwoTower, catalog: Catalog, id_rows: np.ndarray, device, batch_size: int = 64,
                num_workers: int = 0, progress: bool = True) -> np.ndarray:
    """``(N, D)`` float32 embeddings of every catalog item, in catalog order."""
    dataset = make_item_dataset(catalog, model, id_rows)
    loader = item_loader(dataset, batch_size=batch_size, num_workers=num_workers)
    out = []
    for batch in tqdm(loader, desc="embedding items", disable=not progress, unit="batch"):
        batch.pop("row")
        out.append(model.item.encode_items(to_device(batch, device)).float().cpu().numpy())
    return np.concatenate(out) if out else np.zeros((0, model.config.dim), dtype=np.float32)


def build_index(run_dir: str | Path, catalog_dir: str | Path | None = None, factory: str | None = None,
                batch_size: int | None = None, num_workers: int = 0, device: str = "auto",
                progress: bool = True) -> Path:
    """Embed every item of the catalog (default: the run's) and write a new live index version.

    Items that were not in training get no id vector (cold start) and are embedded from their content.
    Returns the new version folder.
    """
    run_dir = Path(run_dir)
    config = load_config_from_run(run_dir)
    dev = resolve_device(device)
    model = load_towers(run_dir, dev)
    catalog = load_catalog(catalog_dir or run_catalog(run_dir))
    trained = pl.read_parquet(run_dir / "split_items.parquet")["item_id"]
    row_of_trained = {item_id: r for r, item_id in enumerate(trained.to_list())}
    id_rows = np.array([row_of_trained.get(i, -1) for i in catalog.items["item_id"].to_list()], dtype=np.int64)
    t0 = time.time()
    vectors = embed_items(model, catalog, id_rows, dev, batch_size or config.item.text.batch_size,
                          num_workers, progress)
    logger.info("embedded %d items in %.1fs", len(vectors), time.time() - t0)
    factory = factory or config.index.factory
    ids = faiss_ids(catalog.items["item_id"])
    index = build_faiss(vectors, ids, factory, config.index.nprobe, config.index.ef_search)
    items = catalog.items.select(
        pl.Series("faiss_id", ids), "item_id", "title", "text"
    )
    manifest = Manifest(
        fingerprint=item_fingerprint(model), dim=config.dim, metric="ip", count=len(vectors), factory=factory,
        created=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), catalog_sha256=catalog_sha256(catalog.root),
    )
    return write_version(run_dir / "index", index, items, manifest)
