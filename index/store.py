"""FAISS indexes over stable item ids, with a manifest, one folder per version and an atomic live pointer.

Layout inside a run directory::

    index/
      LIVE                      # name of the live version (replaced atomically)
      v20261128-101500-3f2a/    # one folder per build
        index.faiss
        items.parquet           # FAISS id -> item_id, title
        manifest.json

A version folder is written under a temporary name and renamed into place only when complete, and ``LIVE``
moves to it only after that, so a reader never sees a half-written index.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path

import faiss
import numpy as np
import polars as pl

from data.atomic import temp_dir, write_text
from data.rundir import RunDir
from errors import IndexStateError

logger = logging.getLogger(__name__)

MANIFEST_VERSION = 1


@dataclass(frozen=True)
class Manifest:
    fingerprint: str  # item-tower fingerprint (hash of its weights and config)
    dim: int
    metric: str  # "ip": inner product over L2-normalised vectors (cosine)
    count: int
    factory: str
    created: str  # ISO-8601 UTC
    catalog_sha256: str = ""
    format: int = MANIFEST_VERSION

    @classmethod
    def read(cls, path: Path) -> Manifest:
        try:
            data = json.loads(path.read_text())
            return cls(**data)
        except (OSError, json.JSONDecodeError, TypeError) as err:
            raise IndexStateError(f"{path}: unreadable index manifest ({err})") from None


def build_faiss(vectors: np.ndarray, ids: np.ndarray, factory: str = "Flat", nprobe: int = 16,
                ef_search: int = 64) -> faiss.Index:
    """An inner-product ``IndexIDMap2`` over ``vectors (N, D)`` float32 with int64 ``ids (N,)``.

    Trainable factories (IVF, PQ) are trained on the vectors themselves.
    """
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    ids = np.ascontiguousarray(ids, dtype=np.int64)
    assert vectors.ndim == 2 and ids.shape == (vectors.shape[0],), (vectors.shape, ids.shape)
    if not np.isfinite(vectors).all():
        raise IndexStateError("item embeddings contain NaN or inf; the item tower's weights are broken")
    base = empty_index(factory, vectors.shape[1], len(vectors))
    if not base.is_trained:
        try:
            base.train(vectors)
        except RuntimeError as err:
            raise IndexStateError(f"FAISS factory {factory!r} cannot be trained on {len(vectors)} items: "
                                  f"{_faiss_message(err)}") from None
    index = faiss.IndexIDMap2(base)
    index.add_with_ids(vectors, ids)
    set_search_params(index, nprobe, ef_search)
    return index


def empty_index(factory: str, dim: int, count: int) -> faiss.Index:
    """An empty inner-product index for ``factory``; a clear error for a bad string or too few items to train.

    Cheap, so :func:`index.build.build_index` calls it before embedding the catalog.
    """
    try:
        base = faiss.index_factory(dim, factory, faiss.METRIC_INNER_PRODUCT)
    except RuntimeError as err:
        raise IndexStateError(f"bad FAISS factory string {factory!r} for dimension {dim}: "
                              f"{_faiss_message(err)}") from None
    if not base.is_trained:
        need = _min_training_points(base)
        if count < need:
            raise IndexStateError(f"FAISS factory {factory!r} needs at least {need} items to train, the catalog "
                                  f"has {count}; use a smaller one (e.g. 'Flat' or 'IVF{max(1, count // 39)},Flat')")
    return base


def _faiss_message(err: Exception) -> str:
    """The useful line of a FAISS C++ exception (they carry a stack of file and line details)."""
    lines = [ln.strip() for ln in str(err).splitlines() if ln.strip()]
    for ln in lines:
        if ln.startswith("Error"):
            return ln
    return lines[-1] if lines else type(err).__name__


def _min_training_points(index: faiss.Index) -> int:
    """The fewest vectors an untrained index can be trained on (one per IVF list / PQ centroid)."""
    ivf = faiss.try_extract_index_ivf(index)
    need = 1
    if ivf is not None:
        need = max(need, int(ivf.nlist))
    pq = getattr(faiss.downcast_index(index), "pq", None)
    if pq is not None:
        need = max(need, 1 << int(pq.nbits))
    return need


def set_search_params(index: faiss.Index, nprobe: int, ef_search: int) -> None:
    """Apply query-time knobs (IVF ``nprobe``, HNSW ``efSearch``) where the index has them."""
    base = faiss.downcast_index(index.index) if isinstance(index, faiss.IndexIDMap2) else index
    if hasattr(base, "nprobe"):
        base.nprobe = nprobe
    hnsw = getattr(base, "hnsw", None)
    if hnsw is not None:
        hnsw.efSearch = ef_search


def write_version(index_root: Path, index: faiss.Index, items: pl.DataFrame, manifest: Manifest,
                  make_live: bool = True, vectors: np.ndarray | None = None) -> Path:
    """Write a complete version folder atomically, then (optionally) point ``LIVE`` at it.

    ``vectors`` (``(N, D)`` float32, items-table order) are kept beside the index for user towers that read
    item embeddings (``user.input: items``); an ANN index may not reconstruct them exactly.
    """
    if items.height != manifest.count or index.ntotal != manifest.count:
        raise IndexStateError(f"index has {index.ntotal} vectors, items table {items.height}, manifest {manifest.count}")
    if vectors is not None and vectors.shape != (manifest.count, manifest.dim):
        raise IndexStateError(f"vectors have shape {vectors.shape}, manifest says ({manifest.count}, {manifest.dim})")
    name = time.strftime("v%Y%m%d-%H%M%S", time.gmtime()) + f"-{uuid.uuid4().hex[:6]}"
    tmp = temp_dir(index_root, f".{name}-")
    try:
        faiss.write_index(index, str(tmp / RunDir.INDEX_FILE))
        items.write_parquet(tmp / RunDir.INDEX_ITEMS)
        if vectors is not None:
            np.save(tmp / RunDir.INDEX_VECTORS, np.ascontiguousarray(vectors, dtype=np.float32))
        (tmp / RunDir.MANIFEST).write_text(json.dumps(asdict(manifest), indent=2))
        os.replace(tmp, index_root / name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if make_live:
        set_live(index_root, name)
    logger.info("index version %s: %d items, dim %d, %s", name, manifest.count, manifest.dim, manifest.factory)
    return index_root / name


def set_live(index_root: Path, name: str) -> None:
    """Atomically point ``LIVE`` at version ``name`` (which must exist and be complete)."""
    if not (index_root / name / RunDir.MANIFEST).is_file():
        raise IndexStateError(f"{index_root / name}: not a complete index version")
    write_text(index_root / RunDir.LIVE, name + "\n")


def live_version(index_root: Path) -> Path:
    """The folder ``LIVE`` points at."""
    pointer = index_root / RunDir.LIVE
    if not pointer.is_file():
        raise IndexStateError(f"{index_root}: no index built yet (run `towerrec build-index`)")
    folder = index_root / pointer.read_text().strip()
    if not (folder / RunDir.MANIFEST).is_file():
        raise IndexStateError(f"{pointer} points at {folder.name}, which is missing or incomplete")
    return folder


def read_version(folder: Path, expect_fingerprint: str | None = None, expect_dim: int | None = None):
    """Load ``(index, items, manifest)`` from a version folder, refusing a mismatch with the towers."""
    if not (folder / RunDir.MANIFEST).is_file():
        raise IndexStateError(f"{folder}: no such index version (see the folders in {folder.parent})")
    manifest = Manifest.read(folder / RunDir.MANIFEST)
    if expect_fingerprint is not None and manifest.fingerprint != expect_fingerprint:
        raise IndexStateError(
            f"{folder}: index was built with item-tower fingerprint {manifest.fingerprint[:12]}, the loaded towers "
            f"have {expect_fingerprint[:12]}; rebuild it with `towerrec build-index`"
        )
    if expect_dim is not None and manifest.dim != expect_dim:
        raise IndexStateError(f"{folder}: index dimension {manifest.dim} does not match the towers' dimension {expect_dim}")
    try:
        index = faiss.read_index(str(folder / RunDir.INDEX_FILE))
        items = pl.read_parquet(folder / RunDir.INDEX_ITEMS)
    except (RuntimeError, OSError, pl.exceptions.PolarsError) as err:
        raise IndexStateError(f"{folder}: cannot read index files ({str(err).splitlines()[0]})") from None
    if index.ntotal != manifest.count or items.height != manifest.count or index.d != manifest.dim:
        raise IndexStateError(f"{folder}: index holds {index.ntotal} vectors of dim {index.d}, items table "
                          f"{items.height}, manifest says {manifest.count} of dim {manifest.dim}")
    return index, items, manifest


def read_vectors(folder: Path, manifest: Manifest) -> np.ndarray:
    """The item embeddings kept beside an index version (memory-mapped), checked against its manifest."""
    path = folder / RunDir.INDEX_VECTORS
    if not path.is_file():
        raise IndexStateError(f"{path}: not found; this index was built without item vectors, which an "
                              "item-sequence user tower needs: rebuild it with `towerrec build-index`")
    try:
        vectors = np.load(path, mmap_mode="r")
    except (OSError, ValueError) as err:
        raise IndexStateError(f"{path}: unreadable ({err})") from None
    if vectors.shape != (manifest.count, manifest.dim):
        raise IndexStateError(f"{path}: shape {vectors.shape}, manifest says ({manifest.count}, {manifest.dim})")
    return vectors
