"""FAISS indexes over stable item ids, with a manifest, one folder per version and an atomic live pointer.

Layout inside a run directory::

    index/
      LIVE                              # name of the live version (replaced atomically)
      v20261128-101500-123456-3f2a/     # one folder per build (names sort by creation time)
        index.faiss                     # IndexIDMap2 over the searchable items (stable 64-bit ids)
        items.parquet                   # faiss_id, item_id, title, text, content_hash, searchable
        vectors.npy                     # (rows, D) float32, items-table order (retired rows included)
        embeddings/part-00000.parquet   # the export format (see README "Exporting embeddings")
        manifest.json

A version folder is written under a temporary name, its files fsync'ed, and renamed into place only when
complete; ``LIVE`` moves to it only after that (itself replaced atomically and fsync'ed), so a reader never
sees a half-written index and a crash never leaves ``LIVE`` pointing at one. A reader holding an older
version keeps answering from it (the index is in memory, the vectors memory-mapped) until it reloads, and
:func:`prune_versions` keeps the last few versions (never the live one) so a reload finds its version too.

*Retired* rows are items that left the catalog but may still appear in a user's history: their vectors stay
in ``vectors.npy`` and the items table (``searchable`` false), so a history holding them still embeds, but
they are not in the FAISS index and are never recommended.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import time
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path

import faiss
import numpy as np
import polars as pl

from data.atomic import fsync_dir, temp_dir, write_file
from data.rundir import RunDir
from errors import IndexStateError

logger = logging.getLogger(__name__)

MANIFEST_VERSION = 3  # 2: retired rows, content hashes, embeddings export, provenance of a reindex; 3: catalog path
METRIC = "ip"
EMBEDDINGS_PART_ROWS = 100_000  # rows per Parquet part of the embeddings export


@dataclass(frozen=True)
class Manifest:
    fingerprint: str  # item-tower fingerprint (hash of its weights and config)
    dim: int
    metric: str  # "ip": inner product over L2-normalised vectors (cosine)
    count: int  # searchable items: vectors in the FAISS index
    factory: str
    created: str  # ISO-8601 UTC
    catalog_sha256: str = ""  # sha256 of the catalog the version serves (data.catalog.catalog_sha256)
    catalog_path: str = ""  # absolute path of that catalog: what a plain reindex serves next ("": not recorded)
    format: int = MANIFEST_VERSION
    retired: int = 0  # rows kept for histories only (items that left the catalog): not in the FAISS index
    base: str = ""  # the version this one was derived from by an incremental reindex ("" for a full build)
    embedded: int = -1  # rows embedded for this version (the rest were copied from ``base``); -1: unknown
    mode: str = ""  # "full" or "incremental"

    @property
    def rows(self) -> int:
        """Rows of the items table and of ``vectors.npy``: searchable plus retired."""
        return self.count + self.retired

    @classmethod
    def read(cls, path: Path) -> Manifest:
        try:
            data = json.loads(path.read_text())
            fmt = data.get("format", MANIFEST_VERSION) if isinstance(data, dict) else MANIFEST_VERSION
            if isinstance(fmt, int) and fmt > MANIFEST_VERSION:  # checked first: a newer format has new keys
                raise IndexStateError(f"{path}: manifest format {fmt} is newer than this towerrec reads "
                                      f"({MANIFEST_VERSION}); upgrade towerrec or rebuild the index")
            manifest = cls(**data)
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, TypeError) as err:
            raise IndexStateError(f"{path}: unreadable index manifest ({err})") from None
        if manifest.metric != METRIC:
            raise IndexStateError(f"{path}: metric {manifest.metric!r}, towerrec serves inner product ({METRIC!r})")
        return manifest


TRAIN_SAMPLE = 100_000  # vectors an IVF / PQ index trains on at most (40 per IVF list or PQ centroid if more)


def build_faiss(vectors: np.ndarray, ids: np.ndarray, factory: str = "Flat", nprobe: int = 16,
                ef_search: int = 64, train_size: int = TRAIN_SAMPLE, seed: int = 0) -> faiss.Index:
    """An inner-product ``IndexIDMap2`` over ``vectors (N, D)`` float32 with int64 ``ids (N,)``.

    Trainable factories (IVF, PQ) are trained on a seeded sample of the vectors: ``train_size`` of them, or 40
    per IVF list / PQ centroid where that is more (k-means wants about 40 points per centroid), or all.
    """
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    ids = np.ascontiguousarray(ids, dtype=np.int64)
    assert vectors.ndim == 2 and ids.shape == (vectors.shape[0],), (vectors.shape, ids.shape)
    if not np.isfinite(vectors).all():
        raise IndexStateError("item embeddings contain NaN or inf; the item tower's weights are broken")
    base = empty_index(factory, vectors.shape[1], len(vectors))
    if not base.is_trained:
        size = min(len(vectors), max(train_size, 40 * _min_training_points(base)))
        sample = vectors
        if size < len(vectors):
            sample = vectors[np.sort(np.random.default_rng(seed).choice(len(vectors), size, replace=False))]
        logger.info("training %s on %d of %d vectors (seed %d)", factory, size, len(vectors), seed)
        try:
            base.train(sample)
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


def update_index(index: faiss.IndexIDMap2, remove_ids: np.ndarray, vectors: np.ndarray, ids: np.ndarray) -> bool:
    """Remove ``remove_ids`` from ``index`` and add ``vectors (M, D)`` under ``ids (M,)``, in place.

    Adding works for every index type. Removing works where the storage is flat (``Flat``, ``PQ``, ``SQ``:
    ``IndexFlatCodes`` compacts, so ``IndexIDMap2``'s id map stays aligned). An IVF list keeps the internal
    ids of the vectors after a removal, which would misalign that id map, and HNSW cannot remove at all: for
    those this returns False without changing anything, and the caller uses :func:`refill_index`. An IVF
    index keeps its trained quantizer: added vectors go to the nearest existing lists, which is right for a
    small change (a full reindex retrains it).
    """
    remove_ids = np.ascontiguousarray(remove_ids, dtype=np.int64)
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    ids = np.ascontiguousarray(ids, dtype=np.int64)
    assert vectors.ndim == 2 and ids.shape == (vectors.shape[0],), (vectors.shape, ids.shape)
    if not np.isfinite(vectors).all():
        raise IndexStateError("item embeddings contain NaN or inf; the item tower's weights are broken")
    if len(remove_ids):
        if not isinstance(faiss.downcast_index(index.index), faiss.IndexFlatCodes):
            return False
        before = index.ntotal
        removed = index.remove_ids(faiss.IDSelectorBatch(remove_ids))
        if removed != len(np.unique(remove_ids)) or index.ntotal != before - removed:
            raise IndexStateError(f"removed {removed} of {len(remove_ids)} ids from the index: it does not hold "
                                  "the vectors its items table says")
    if len(ids):
        index.add_with_ids(vectors, ids)
    return True


def refill_index(index: faiss.IndexIDMap2, vectors: np.ndarray, ids: np.ndarray) -> None:
    """Empty ``index`` and add ``vectors`` under ``ids``, keeping what it was trained on (IVF centroids, PQ
    codebooks): a rebuild without the training, for index types that cannot remove in place."""
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    ids = np.ascontiguousarray(ids, dtype=np.int64)
    assert vectors.ndim == 2 and ids.shape == (vectors.shape[0],), (vectors.shape, ids.shape)
    if not np.isfinite(vectors).all():
        raise IndexStateError("item embeddings contain NaN or inf; the item tower's weights are broken")
    index.reset()
    index.add_with_ids(vectors, ids)


# The names :func:`version_name` makes, and those of the temporary folders :func:`write_version` fills
# (``tempfile.mkdtemp`` adds 8 characters). Only folders with these names are ever deleted by pruning: any
# other entry of ``index/`` (a folder a person put there, a symlink) is not towerrec's and is left alone.
VERSION_NAME = re.compile(r"v\d{8}-\d{6}-\d{6}-[0-9a-f]{4}")
STAGING_NAME = re.compile(r"\.v\d{8}-\d{6}-\d{6}-[0-9a-f]{4}-[a-z0-9_]{8}")


def version_name() -> str:
    """A new version folder name; names sort by creation time (to the microsecond)."""
    now = time.time()
    stamp = time.strftime("v%Y%m%d-%H%M%S", time.gmtime(now))
    return f"{stamp}-{int(now * 1e6) % 1_000_000:06d}-{uuid.uuid4().hex[:4]}"


def is_version_folder(path: Path) -> bool:
    """True for a complete version folder that towerrec wrote: a real folder (not a symlink) with a version
    name and a manifest."""
    return (VERSION_NAME.fullmatch(path.name) is not None and path.is_dir() and not path.is_symlink()
            and (path / RunDir.MANIFEST).is_file())


def write_version(index_root: Path, index: faiss.Index, items: pl.DataFrame, manifest: Manifest,
                  make_live: bool = True, vectors: np.ndarray | None = None,
                  embeddings: pl.DataFrame | None = None) -> Path:
    """Write a complete version folder atomically (files fsync'ed), then (optionally) point ``LIVE`` at it.

    ``items`` has ``manifest.rows`` rows (searchable ones, then retired ones may follow in any order); the
    index holds the ``manifest.count`` searchable ones. ``vectors`` (``(rows, D)`` float32, items-table
    order) are kept beside the index for user towers that read item embeddings (``user.input: items``) and
    for later reindexes; an ANN index may not reconstruct them exactly. ``embeddings`` is the export table
    (see :func:`embeddings_table`), written as Parquet parts.
    """
    if items.height != manifest.rows or index.ntotal != manifest.count:
        raise IndexStateError(f"index has {index.ntotal} vectors, items table {items.height}, manifest "
                              f"{manifest.count} (+{manifest.retired} retired)")
    if vectors is not None and vectors.shape != (manifest.rows, manifest.dim):
        raise IndexStateError(f"vectors have shape {vectors.shape}, manifest says ({manifest.rows}, {manifest.dim})")
    if embeddings is not None and embeddings.height != manifest.rows:
        raise IndexStateError(f"embeddings table has {embeddings.height} rows, manifest says {manifest.rows}")
    name = version_name()
    tmp = temp_dir(index_root, f".{name}-")
    try:
        faiss.write_index(index, str(tmp / RunDir.INDEX_FILE))
        items.write_parquet(tmp / RunDir.INDEX_ITEMS)
        if vectors is not None:
            np.save(tmp / RunDir.INDEX_VECTORS, np.ascontiguousarray(vectors, dtype=np.float32))
        if embeddings is not None:
            parts = tmp / RunDir.INDEX_EMBEDDINGS
            parts.mkdir()
            for k, start in enumerate(range(0, max(embeddings.height, 1), EMBEDDINGS_PART_ROWS)):
                embeddings.slice(start, EMBEDDINGS_PART_ROWS).write_parquet(parts / f"part-{k:05d}.parquet")
        (tmp / RunDir.MANIFEST).write_text(json.dumps(asdict(manifest), indent=2))
        fsync_tree(tmp)
        os.replace(tmp, index_root / name)
        fsync_dir(index_root)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if make_live:
        set_live(index_root, name)
    logger.info("index version %s: %d items (+%d retired), dim %d, %s", name, manifest.count, manifest.retired,
                manifest.dim, manifest.factory)
    return index_root / name


def embeddings_table(items: pl.DataFrame, vectors: np.ndarray, fingerprint: str) -> pl.DataFrame:
    """The export table: ``item_id``, ``faiss_id`` (int64), ``vector`` (fixed-size list of float32, length
    D), ``fingerprint``, ``content_hash`` and ``searchable``, one row per items-table row."""
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    return pl.DataFrame({
        "item_id": items["item_id"],
        "faiss_id": items["faiss_id"].cast(pl.Int64),
        "vector": pl.Series("vector", vectors, dtype=pl.Array(pl.Float32, vectors.shape[1])),
        "fingerprint": pl.Series("fingerprint", [fingerprint] * items.height, dtype=pl.Utf8),
        "content_hash": items["content_hash"],
        "searchable": items["searchable"],
    })


def set_live(index_root: Path, name: str) -> None:
    """Atomically (and durably: fsync'ed) point ``LIVE`` at version ``name``, which must exist and be complete."""
    if not is_version_name(name) or not (index_root / name / RunDir.MANIFEST).is_file():
        raise IndexStateError(f"{index_root / name}: not a complete index version")
    write_durable(index_root / RunDir.LIVE, lambda tmp: tmp.write_text(name + "\n"))


def list_versions(index_root: Path) -> list[Path]:
    """Complete version folders written by towerrec (see :func:`is_version_folder`), oldest first."""
    if not index_root.is_dir():
        return []
    return sorted((p for p in index_root.iterdir() if is_version_folder(p)), key=lambda p: p.name)


def prune_versions(index_root: Path, keep: int = 3, stale_after_s: float = 3600.0) -> list[Path]:
    """Delete all but the ``keep`` newest complete versions; the live one is never deleted.

    A reader holding a deleted version keeps answering (its index is in memory and, on POSIX, its memory
    map outlives the file), but one that reloads by version name would not find it: keep at least 2.
    Temporary folders of writers killed more than ``stale_after_s`` ago go too. Only folders with the names
    towerrec gives them are considered (see :data:`VERSION_NAME`); a symlink is never followed or removed.
    Returns the deleted folders.
    """
    if keep < 1:
        raise IndexStateError(f"keep must be at least 1 (the live version), got {keep}")
    try:
        live = live_version(index_root).name
    except IndexStateError:
        live = None
    versions = list_versions(index_root)
    doomed = [p for p in versions[:-keep] if p.name != live]
    now = time.time()
    for p in index_root.iterdir() if index_root.is_dir() else ():
        if (STAGING_NAME.fullmatch(p.name) and p.is_dir() and not p.is_symlink()
                and now - p.stat().st_mtime > stale_after_s):
            doomed.append(p)
    for p in doomed:
        if not p.name.startswith("."):
            # Renamed to a staging name first, in one step: a process killed while deleting leaves a folder
            # that no loader lists (and a later prune removes), never a version with some of its files gone.
            trash = p.with_name(f".{p.name}-{uuid.uuid4().hex[:8]}")
            os.replace(p, trash)
            shutil.rmtree(trash, ignore_errors=True)
            gone = not trash.exists()
        else:
            shutil.rmtree(p, ignore_errors=True)
            gone = not p.exists()
        if gone:
            logger.info("pruned index version %s", p.name)
        else:
            logger.warning("could not delete all of the old index version %s", p)
    return doomed


# -- durable writes ------------------------------------------------------------------------------------------
def fsync_tree(root: Path) -> None:
    """fsync every file and folder under ``root`` (``root`` included)."""
    for path in sorted(root.rglob("*"), key=lambda p: len(p.parts), reverse=True):
        if path.is_file():
            with path.open("rb") as f:
                os.fsync(f.fileno())
        elif path.is_dir():
            fsync_dir(path)
    fsync_dir(root)


def write_durable(path: Path, write) -> None:
    """Write a file atomically and durably (:func:`data.atomic.write_file` with ``durable``)."""
    write_file(path, write, durable=True)


def _recover(index_root: Path) -> str:
    return (f"publish a new version with `towerrec build-index --run {index_root.parent}` or `towerrec reindex "
            f"--run {index_root.parent}`, or write the name of a version folder of {index_root} into it")


def live_name(index_root: Path) -> str | None:
    """The version name ``LIVE`` holds; None when there is no ``LIVE`` (no index built yet).

    An empty, unreadable or non-file ``LIVE``, or one naming anything but a folder directly inside
    ``index_root`` (a path, ``..``, a dot-named staging folder), is an :class:`IndexStateError` naming the file
    and how to recover. Whether that folder exists is :func:`live_version`'s check.
    """
    pointer = index_root / RunDir.LIVE
    if not pointer.exists() and not pointer.is_symlink():
        return None
    if not pointer.is_file():
        raise IndexStateError(f"{pointer}: not a file (it should hold the name of the live version folder); "
                              f"remove it, then {_recover(index_root)}")
    try:
        name = pointer.read_text().strip()
    except (OSError, UnicodeDecodeError) as err:
        raise IndexStateError(f"{pointer}: unreadable ({getattr(err, 'strerror', None) or err}); "
                              f"{_recover(index_root)}") from None
    if not name:
        raise IndexStateError(f"{pointer} is empty: it names no live version; {_recover(index_root)}")
    if not is_version_name(name):
        raise IndexStateError(f"{pointer} names {name[:80]!r}, which is not a version folder of {index_root}; "
                              f"{_recover(index_root)}")
    return name


def is_version_name(name: str) -> bool:
    """True for a name that can only mean a folder directly inside the index folder, and not a staging one:
    no path separator, not ``.``/``..``, not dot-named. Version names given by hand (a rollback) qualify."""
    return bool(name) and not name.startswith(".") and not any(c in name for c in "/\\\0\n")


def live_version(index_root: Path) -> Path:
    """The folder ``LIVE`` points at: a version folder directly inside ``index_root``, never a path elsewhere.

    Every way ``LIVE`` can be wrong (absent, empty, not a file, naming something outside ``index_root`` or a
    folder that is missing or incomplete) is an :class:`IndexStateError` that says how to recover.
    """
    name = live_name(index_root)
    if name is None:
        raise IndexStateError(f"{index_root}: no index built yet (run `towerrec build-index`)")
    folder = index_root / name
    if not (folder / RunDir.MANIFEST).is_file():
        raise IndexStateError(f"{index_root / RunDir.LIVE} points at {name}, which is missing or incomplete; "
                              f"{_recover(index_root)}")
    return folder


def read_version(folder: Path, expect_fingerprint: str | None = None, expect_dim: int | None = None):
    """Load ``(index, items, manifest)`` from a version folder, refusing a mismatch with the towers."""
    if not (folder / RunDir.MANIFEST).is_file():
        raise IndexStateError(f"{folder}: no such index version (see the folders in {folder.parent})")
    manifest = Manifest.read(folder / RunDir.MANIFEST)
    if expect_fingerprint is not None and manifest.fingerprint != expect_fingerprint:
        raise IndexStateError(
            f"{folder}: index was built with item-tower fingerprint {manifest.fingerprint[:12]}, the loaded towers "
            f"have {expect_fingerprint[:12]}; rebuild it with `towerrec build-index` (or `towerrec reindex`)"
        )
    if expect_dim is not None and manifest.dim != expect_dim:
        raise IndexStateError(f"{folder}: index dimension {manifest.dim} does not match the towers' dimension {expect_dim}")
    try:
        index = faiss.read_index(str(folder / RunDir.INDEX_FILE))
        items = pl.read_parquet(folder / RunDir.INDEX_ITEMS)
    except (RuntimeError, OSError, pl.exceptions.PolarsError) as err:
        raise IndexStateError(f"{folder}: cannot read index files ({str(err).splitlines()[0]})") from None
    if index.ntotal != manifest.count or items.height != manifest.rows or index.d != manifest.dim:
        raise IndexStateError(f"{folder}: index holds {index.ntotal} vectors of dim {index.d}, items table "
                              f"{items.height} rows, manifest says {manifest.count} (+{manifest.retired} retired) "
                              f"of dim {manifest.dim}")
    if "searchable" in items.columns and int(items["searchable"].sum()) != manifest.count:
        raise IndexStateError(f"{folder}: items table marks {int(items['searchable'].sum())} items searchable, "
                              f"manifest says {manifest.count}")
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
    if vectors.shape != (manifest.rows, manifest.dim):
        raise IndexStateError(f"{path}: shape {vectors.shape}, manifest says ({manifest.rows}, {manifest.dim})")
    return vectors
