"""What a reindex works from: which catalog (:func:`choose_catalog`), each item's content hash, the plan of rows
to embed against the base version, the resumable chunk files, and the embedder that fills them
(:mod:`index.reindex` runs it)."""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import numpy as np
import polars as pl
import torch
import torch.distributed as dist

from data.catalog import ITEMS_FILE, Catalog
from data.ids import faiss_ids
from data.items import item_loader, item_text, to_device
from data.rundir import RunDir
from errors import CatalogError, IndexStateError, MediaError
from index.store import (
    Manifest,
    list_versions,
    live_version,
    read_vectors,
    write_durable,
)
from towers.factory import TwoTower, make_item_dataset
from towers.feature_cache import cached_text_features, text_encoder_is_cacheable

logger = logging.getLogger("index.reindex")

CHUNK_COLUMNS = ("item_id", "faiss_id", "vector", "fingerprint", "content_hash", "searchable")
# Why a catalog was indexed (ReindexResult.catalog_source).
CATALOG_GIVEN = "given"
CATALOG_LIVE = "the live version's catalog"
CATALOG_NEWEST = "the newest version's catalog (LIVE is unusable)"
CATALOG_TRAINING = "the training catalog"


def content_hashes(catalog: Catalog, config, id_rows: np.ndarray, rows: list[int] | None = None) -> list[str]:
    """Per item, a hash of everything the item tower reads (hex, 32 characters).

    The text exactly as the text encoder receives it (title, genres, truncated description; see
    :func:`data.items.item_text`), the bytes of the image and audio files, and the id-table row, each only
    where the item tower uses that modality. Items ``rows`` only (default: all), in that order.
    """
    items = catalog.items
    rows = list(range(items.height)) if rows is None else list(rows)
    cfg = config.item
    texts = item_text(items[rows], config.data.item_text_chars) if cfg.text.enabled else None
    media = [c for c, on in (("image_path", cfg.image.enabled), ("audio_path", cfg.audio.enabled)) if on]
    columns = {c: items[c].to_list() for c in media}
    item_ids = items["item_id"].to_list()
    digests: dict[Path, bytes] = {}  # a file shared by several items is read once
    out = []
    for k, r in enumerate(rows):
        h = hashlib.blake2b(digest_size=16)
        if texts is not None:
            h.update(b"text\0" + texts[k].encode() + b"\0")
        for c in media:
            h.update(c.encode() + b"\0")
            rel = columns[c][r]
            if rel is not None:
                path = catalog.media_path(rel)
                if path not in digests:
                    digests[path] = _file_digest(path, f"{catalog.root / 'items.parquet'} row {r + 1}: item_id "
                                                       f"{item_ids[r]!r}, field {c!r}")
                h.update(digests[path])
            h.update(b"\0")
        if cfg.id_embedding:
            h.update(b"id\0" + str(int(id_rows[r])).encode())
        out.append(h.hexdigest())
    return out


def _file_digest(path: Path, where: str) -> bytes:
    h = hashlib.blake2b(digest_size=16)
    try:
        with path.open("rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
    except OSError as err:
        raise MediaError(f"{where}: cannot read {path} ({err.strerror or err})") from None
    return h.digest()


# -- the plan ------------------------------------------------------------------------------------------------
@dataclass
class _Source:
    """A catalog items are embedded from: the new catalog (0), or the training catalog for retired items (1)."""

    catalog: Catalog
    id_rows: np.ndarray  # catalog row -> id-table row (-1: no id vector, cold start)


@dataclass
class _Base:
    """The live version a reindex starts from."""

    folder: Path
    manifest: Manifest
    items: pl.DataFrame
    vectors: np.ndarray | None  # memory-mapped; None when the version kept none
    row_of: dict  # item id -> row
    hashes: list | None  # content hash per row (None: a version written before content hashes)
    searchable: np.ndarray  # bool per row


@dataclass
class _Row:
    item_id: object
    title: str
    text: str | None
    content_hash: str
    searchable: bool
    source: int  # index into the sources, -1: none (copied from the live version only)
    src_row: int
    base_row: int  # row in the live version, -1: not there
    copy: bool  # copied from the live version (else embedded)


def _load_base(index_root: Path) -> _Base | None:
    """The live version (its manifest, items and memory-mapped vectors; the FAISS index is read only if it is
    updated), or None when there is none or it cannot be read: then everything is embedded."""
    try:
        folder = live_version(index_root)
        manifest = Manifest.read(folder / RunDir.MANIFEST)
        try:
            items = pl.read_parquet(folder / RunDir.INDEX_ITEMS)
        except (OSError, pl.exceptions.PolarsError) as err:
            raise IndexStateError(f"{folder}: unreadable items table ({str(err).splitlines()[0]})") from None
        if items.height != manifest.rows:
            raise IndexStateError(f"{folder}: items table has {items.height} rows, manifest says {manifest.rows}")
    except IndexStateError as err:
        if (index_root / RunDir.LIVE).is_file():
            logger.warning("ignoring the live index version (%s): everything is embedded again", err)
        return None
    try:
        vectors = read_vectors(folder, manifest)
    except IndexStateError:
        vectors = None
    ids = items["item_id"].to_list()
    searchable = (items["searchable"].to_numpy().astype(bool) if "searchable" in items.columns
                  else np.ones(items.height, dtype=bool))
    hashes = items["content_hash"].to_list() if "content_hash" in items.columns else None
    return _Base(folder, manifest, items, vectors, {x: i for i, x in enumerate(ids)}, hashes, searchable)


def _training_catalog(run: RunDir, catalog_dir) -> Catalog | None:
    """The run's training catalog, when it differs from the catalog being indexed and is still there unchanged
    (its items that left the new catalog become retired rows); None otherwise."""
    if catalog_dir is None:
        return None
    try:
        ref = run.catalog_ref()
        if Path(ref["path"]).resolve() == Path(catalog_dir).resolve():
            return None
        return run.load_catalog()
    except (CatalogError, MediaError) as err:
        logger.warning("the run's training catalog is not available (%s): items that left the catalog are "
                       "kept only where the live index version has them", err)
        return None


def _recorded_version(index_root: Path) -> tuple[Path, Manifest, str] | None:
    """``(folder, manifest, why)`` of the version whose catalog a plain reindex serves again: the live one, or
    the newest complete one when ``LIVE`` is unusable; None when the run has no index version."""
    try:
        folder = live_version(index_root)
        return folder, Manifest.read(folder / RunDir.MANIFEST), CATALOG_LIVE
    except IndexStateError as err:
        live_error = err
    for folder in reversed(list_versions(index_root)):
        try:
            manifest = Manifest.read(folder / RunDir.MANIFEST)
        except IndexStateError:
            continue
        logger.warning("%s; reindexing the catalog of %s, the newest index version", live_error, folder.name)
        return folder, manifest, CATALOG_NEWEST
    return None


def choose_catalog(run: RunDir, catalog_dir: str | Path | None) -> tuple[Path | None, str]:
    """The catalog a reindex indexes, and why: ``(folder, why)``; folder None means the run's training catalog
    (loaded hash-checked by :meth:`data.rundir.RunDir.load_catalog`).

    A given catalog wins. Otherwise the catalog recorded in the live version's manifest (what the run serves
    now), so that a plain reindex never undoes a ``reindex --catalog``; the training catalog only when there
    is no index version yet, or the version was built from it. A recorded catalog that is gone raises a
    :class:`CatalogError` naming it; a version built from another catalog without recording its path raises
    an :class:`IndexStateError`: both ask for ``--catalog`` rather than switching catalogs silently.
    """
    if catalog_dir is not None:
        return Path(catalog_dir), CATALOG_GIVEN
    recorded = _recorded_version(run.index_root)
    if recorded is None:
        return None, CATALOG_TRAINING
    folder, manifest, why = recorded
    training = run.catalog_ref()
    if not manifest.catalog_path:  # a version written before manifests recorded the path (format 2)
        if manifest.catalog_sha256 in ("", training["sha256"]):
            return None, CATALOG_TRAINING
        raise IndexStateError(
            f"{folder / RunDir.MANIFEST}: index version {folder.name} was built from a catalog other than the "
            f"training catalog (sha256 {manifest.catalog_sha256[:12]}) and does not record where it is; give "
            "the catalog to serve with --catalog")
    path = Path(manifest.catalog_path)
    if not (path / ITEMS_FILE).is_file():
        raise CatalogError(f"{path}: the catalog index version {folder.name} was built from is not there (moved or "
                           "deleted?); give the catalog to serve with --catalog")
    if path.resolve() == Path(training["path"]).resolve():
        return None, why  # the training catalog, still hash-checked against the run's record
    return path, why


def _check_id_types(new: pl.DataFrame, other: pl.DataFrame, what: str, where: str) -> None:
    if new["item_id"].dtype != other["item_id"].dtype:
        raise CatalogError(f"{where}: item_id is {new['item_id'].dtype}, but {what} has {other['item_id'].dtype} "
                           "item ids; the same items must keep the same ids")


def _plan_rows(sources: list[_Source], config, base: _Base | None, fingerprint: str, full: bool,
               new_where: str) -> tuple[list[_Row], int, bool]:
    """Every row of the new version (the new catalog's items, then retired ones) and whether each is copied.

    Returns ``(rows, dropped, incremental)``: ``incremental`` when the live version's vectors can be reused
    (same item tower, content hashes recorded, not ``full``).
    """
    same_towers = base is not None and base.vectors is not None and base.manifest.fingerprint == fingerprint
    incremental = same_towers and not full and base.hashes is not None
    new = sources[0].catalog.items
    if base is not None:
        _check_id_types(new, base.items, f"the live index version {base.folder.name}", new_where)
    rows: list[_Row] = []
    hashes = content_hashes(sources[0].catalog, config, sources[0].id_rows)
    new_ids = new["item_id"].to_list()
    texts = new["text"].to_list() if "text" in new.columns else [None] * new.height
    for r, (item_id, title, text, h) in enumerate(zip(new_ids, new["title"].to_list(), texts, hashes)):
        b = base.row_of.get(item_id, -1) if base is not None else -1
        copy = incremental and b >= 0 and base.hashes[b] == h
        rows.append(_Row(item_id, title, text, h, True, 0, r, b, copy))
    known = set(new_ids)
    if len(sources) > 1:  # the training catalog's items that left the catalog: retired
        old = sources[1].catalog.items
        _check_id_types(new, old, "the run's training catalog", new_where)
        ids = old["item_id"].to_list()
        gone = [r for r, x in enumerate(ids) if x not in known]
        old_texts = old["text"].to_list() if "text" in old.columns else [None] * old.height
        titles = old["title"].to_list()
        for r, h in zip(gone, content_hashes(sources[1].catalog, config, sources[1].id_rows, gone)):
            b = base.row_of.get(ids[r], -1) if base is not None else -1
            copy = incremental and b >= 0 and base.hashes[b] == h
            rows.append(_Row(ids[r], titles[r], old_texts[r], h, False, 1, r, b, copy))
            known.add(ids[r])
    dropped = 0
    if base is not None:  # rows of the live version known nowhere else: copied while the towers are the same
        texts = base.items["text"].to_list() if "text" in base.items.columns else [None] * base.items.height
        for b, (item_id, title) in enumerate(zip(base.items["item_id"].to_list(), base.items["title"].to_list())):
            if item_id in known:
                continue
            if same_towers:
                h = base.hashes[b] if base.hashes is not None else ""
                rows.append(_Row(item_id, title, texts[b], h, False, -1, -1, b, True))
            else:
                dropped += 1
    if dropped:
        logger.warning("%d item(s) of the live index version left the catalog and are not in the run's training "
                       "catalog: with the item tower changed they cannot be embedded again and are dropped (a "
                       "history naming them is refused as unknown)", dropped)
    return rows, dropped, incremental


def _plan_key(fingerprint: str, dim: int, chunk_size: int, todo: list[_Row], id_dtype) -> str:
    """Hash of everything that decides the chunk files: towers, chunking, and the items with their content."""
    h = hashlib.sha256(json.dumps({"fingerprint": fingerprint, "dim": dim, "chunk_size": chunk_size,
                                   "id_dtype": str(id_dtype), "format": 1}).encode())
    for row in todo:
        h.update(f"{row.item_id!r}\0{row.content_hash}\0{int(row.searchable)}\n".encode())
    return h.hexdigest()


# -- processes -----------------------------------------------------------------------------------------------
def _distributed(device: torch.device) -> tuple[torch.device, int, int, bool]:
    """``(device, rank, world, joined)``: joins torchrun's process group when launched by it, the same
    way the training loop joins it (this module stays independent of the training package)."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return device, 0, 1, False
    joined = False
    if not dist.is_initialized():
        # Process 0 waits at a barrier while the others embed: the default 30-minute timeout is too short.
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=timedelta(hours=24))
        joined = True
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    return device, dist.get_rank(), dist.get_world_size(), joined


def _barrier(world: int) -> None:
    if world > 1:
        dist.barrier()


@contextlib.contextmanager
def _index_lock(index_root: Path, enabled: bool = True):
    """One reindex at a time per run: an exclusive ``flock`` on the index folder (released when the process
    dies, so a killed reindex never leaves a stale lock)."""
    if not enabled:
        yield
        return
    index_root.mkdir(parents=True, exist_ok=True)
    fd = os.open(index_root, os.O_RDONLY)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise IndexStateError(f"{index_root}: another reindex or build-index of this run is running; "
                                  "wait for it to finish") from None
        yield
    finally:
        os.close(fd)


# -- chunks --------------------------------------------------------------------------------------------------
def _chunk_ok(path: Path, want: list[_Row], fingerprint: str, dim: int) -> pl.DataFrame | None:
    """The finished chunk at ``path`` if it holds exactly the planned items for these towers; else None."""
    if not path.is_file():
        return None
    try:
        df = pl.read_parquet(path)
    except (OSError, pl.exceptions.PolarsError) as err:
        logger.warning("discarding unreadable chunk %s (%s)", path.name, str(err).splitlines()[0])
        return None
    ok = (tuple(df.columns) == CHUNK_COLUMNS and df.height == len(want)
          and df.schema["vector"] == pl.Array(pl.Float32, dim)
          and df["item_id"].to_list() == [r.item_id for r in want]
          and df["content_hash"].to_list() == [r.content_hash for r in want]
          and (df["fingerprint"] == fingerprint).all())
    if not ok:
        logger.warning("discarding chunk %s: it does not hold the planned items", path.name)
        return None
    return df


def _write_chunk(path: Path, rows: list[_Row], vectors: np.ndarray, fingerprint: str) -> None:
    """Write one finished chunk atomically and durably (a kill leaves either the whole file or none)."""
    ids = pl.Series("item_id", [r.item_id for r in rows])
    df = pl.DataFrame({
        "item_id": ids,
        "faiss_id": pl.Series("faiss_id", faiss_ids(ids), dtype=pl.Int64),
        "vector": pl.Series("vector", np.ascontiguousarray(vectors, dtype=np.float32),
                            dtype=pl.Array(pl.Float32, vectors.shape[1])),
        "fingerprint": pl.Series("fingerprint", [fingerprint] * len(rows), dtype=pl.Utf8),
        "content_hash": pl.Series("content_hash", [r.content_hash for r in rows], dtype=pl.Utf8),
        "searchable": pl.Series("searchable", [r.searchable for r in rows], dtype=pl.Boolean),
    })
    write_durable(path, df.write_parquet)


class _Embedder:
    """Embeds planned rows with the item tower, one source catalog's dataset built once per process."""

    def __init__(self, model: TwoTower, sources: list[_Source], device, batch_size: int, num_workers: int):
        self.model, self.sources, self.device = model, sources, device
        self.batch_size, self.num_workers = batch_size, num_workers
        self._datasets: dict[int, tuple] = {}

    def _dataset(self, s: int):
        if s not in self._datasets:
            source = self.sources[s]
            dataset = make_item_dataset(source.catalog, self.model, source.id_rows)
            texts = None
            if text_encoder_is_cacheable(self.model):
                # The frozen text encoder's features of the whole catalog, where training (or an earlier build)
                # cached them; otherwise each chunk encodes its own texts, so that work is resumable too.
                texts = cached_text_features(self.model, dataset)
                if texts is not None:
                    dataset = dataset.without("text")
            self._datasets[s] = (dataset, texts)
        return self._datasets[s]

    @torch.inference_mode()
    def __call__(self, rows: list[_Row]) -> np.ndarray:
        """``(len(rows), D)`` float32 embeddings, in the order of ``rows``."""
        out = []
        for s in sorted({r.source for r in rows}):  # rows of one chunk come from at most two sources, in order
            dataset, texts = self._dataset(s)
            loader = item_loader(dataset, [r.src_row for r in rows if r.source == s], self.batch_size,
                                 self.num_workers)
            for batch in loader:
                idx = batch.pop("row")
                if texts is not None:
                    batch["text_features"] = texts[idx]
                out.append(self.model.item.encode_items(to_device(batch, self.device)).float().cpu().numpy())
        return np.concatenate(out) if out else np.zeros((0, self.model.config.dim), dtype=np.float32)


# -- reindex -------------------------------------------------------------------------------------------------
