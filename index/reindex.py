"""Rebuild the item embeddings after a retrain or a catalog change, and publish them as a new index version.

``reindex(run_dir, catalog_dir)`` compares what the new version must hold with the live version:

- **the item tower changed** (its fingerprint differs from the live manifest's), there is no usable live
  version, or ``full=True``: every item is embedded again and the FAISS index is built afresh;
- **only the catalog changed**: items that are new, or whose content changed, are embedded; the rest are
  copied from the live version, whose FAISS index is updated in place (remove and add by stable 64-bit id)
  where the index type allows it (HNSW cannot remove: it is rebuilt from the stored vectors, still without
  re-embedding anything). "Content" is what the item tower reads, hashed per item (:func:`content_hashes`):
  its text as the text encoder sees it, the bytes of its image and audio files, and its id-table row.
- **items that left the catalog** but that the run was trained on (its training catalog) or that the live
  version held are kept as *retired* rows: their vectors stay in the version, so a history that holds them
  still embeds (for a known user, in ``evaluate``, or in a history typed by hand), but they are not in the
  FAISS index and are never recommended. A retired row's vector is copied from the live version, or
  embedded from the training catalog when the item tower changed; one that is in neither (its content is
  gone and the towers changed) is dropped, with a warning.

**Which catalog.** A catalog given (``catalog_dir``) is indexed and recorded in the new version's manifest
(path and sha256). Without one, the live version's recorded catalog is indexed again, so a plain reindex
after ``reindex --catalog B`` keeps serving B (what it holds now); only a run without any index version
falls back to the training catalog. A recorded catalog that is gone is an error naming it and ``--catalog``,
never a silent switch to the training catalog.

**Resumable.** The items to embed form a fixed plan, cut into chunks of ``chunk_size`` items; the plan's hash
names its work folder (``index/.reindex-<plan>/``). Each finished chunk is written atomically (temporary
file, fsync, rename) as Parquet in the export schema. A rerun after a crash or a kill finds the same plan,
skips every chunk on disk and embeds the rest; the new version is written (fsync, rename) and ``LIVE``
switched only once every chunk is there, so a partial index is never published. A plan that no longer
applies (the catalog or the towers changed again) is discarded.

**Several processes.** Under ``torchrun`` process ``r`` of ``w`` embeds chunks ``r, r + w, ...`` and writes
its own chunk files; process 0 waits for all of them (barrier), builds the index and publishes. A resumed
run may use a different number of processes: chunks are numbered globally.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import re
import time
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path

import faiss
import numpy as np
import polars as pl
import torch
import torch.distributed as dist

from data.catalog import MEDIA_COLUMNS, Catalog, catalog_sha256, load_catalog
from data.ids import ItemSpace, faiss_ids
from data.items import item_loader, item_text, to_device
from data.rundir import RunDir
from errors import CatalogError, ConfigError, IndexStateError, MediaError
from index.store import (
    Manifest,
    build_faiss,
    embeddings_table,
    empty_index,
    list_versions,
    live_version,
    prune_versions,
    read_vectors,
    read_version,
    refill_index,
    set_search_params,
    update_index,
    write_durable,
    write_version,
)
from towers.device import resolve_device
from towers.factory import TwoTower, item_fingerprint, load_towers, make_item_dataset
from towers.feature_cache import cached_text_features, text_encoder_is_cacheable
from towers.progress import tqdm

logger = logging.getLogger(__name__)

CHUNK_SIZE = 1024  # items per resumable chunk
KEEP_VERSIONS = 3  # index versions kept by default (the live one plus two a reader may still hold)
CHUNK_COLUMNS = ("item_id", "faiss_id", "vector", "fingerprint", "content_hash", "searchable")
# Why a catalog was indexed (ReindexResult.catalog_source).
CATALOG_GIVEN = "given"
CATALOG_LIVE = "the live version's catalog"
CATALOG_NEWEST = "the newest version's catalog (LIVE is unusable)"
CATALOG_TRAINING = "the training catalog"
# The files a reindex writes in its work folder; a folder holding anything else is not deleted.
WORK_NAME = re.compile(r"\.reindex-[0-9a-f]{16}")
WORK_FILE = re.compile(r"(plan\.json|chunk-\d{6}\.parquet|\.(plan\.json|chunk-\d{6}\.parquet)\.[0-9a-f]{8}\.tmp)")


@dataclass(frozen=True)
class ReindexResult:
    """What a reindex did. Counts compare the new version with the live one it started from."""

    version: Path  # the live version folder after the call
    mode: str  # "full" (everything embedded), "incremental" (changed items only) or "unchanged" (nothing to do)
    rows: int  # rows of the new version: searchable items plus retired ones
    searchable: int  # items in the FAISS index
    embedded: int  # rows embedded by this call (and any earlier, interrupted call of the same plan)
    copied: int  # rows copied from the live version
    added: int  # searchable now, not searchable before
    edited: int  # searchable before and now, content changed
    removed: int  # searchable before, not now (retired or dropped)
    retired: int  # rows kept for histories only
    dropped: int  # rows of the live version that could be neither kept nor re-embedded
    chunks: int  # chunks in the plan
    resumed_chunks: int  # chunks found already finished on disk
    index_update: str  # "in-place" (live index updated), "refilled" (emptied and refilled, training kept),
    # "rebuilt" (built and trained afresh) or "none"
    seconds: float
    timings: dict = field(default_factory=dict)  # seconds per phase (plan, embed, publish)
    catalog: Path | None = None  # the catalog folder indexed
    catalog_source: str = ""  # why that one: "given", "the live version's catalog" or "the training catalog"


# -- content hashes -------------------------------------------------------------------------------------------
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
    if not (path / "items.parquet").is_file():
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
    """``(device, rank, world, joined)``: joins torchrun's process group when launched by it (as
    ``train.distributed`` does; serving code does not import training code)."""
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
def reindex(run_dir: str | Path, catalog_dir: str | Path | None = None, *, full: bool = False,
            factory: str | None = None, chunk_size: int = CHUNK_SIZE, keep_versions: int = KEEP_VERSIONS,
            batch_size: int | None = None, num_workers: int = 0, device: str = "auto",
            progress: bool = True) -> ReindexResult:
    """Bring the run's index up to date with its towers and a catalog, embedding only what changed.

    Args:
        run_dir: a trained run (see :class:`data.rundir.RunDir`).
        catalog_dir: the catalog to serve (default: the one the live version was built from, recorded in its
            manifest; with no index version yet, the one the run was trained on, hash-checked). See
            :func:`choose_catalog`; the result says which was used and why.
        full: embed every item again even where the live version's vectors could be copied.
        factory: FAISS factory string (default: the live version's, else the config's ``index.factory``).
            A factory other than the live one's rebuilds the FAISS index (without re-embedding anything).
        chunk_size: items per resumable chunk.
        keep_versions: index versions kept after publishing (older ones are deleted; never the live one).
        batch_size: items per item-tower forward pass (default: the config's ``item.text.batch_size``).
        num_workers: DataLoader workers decoding media.
        device: "auto", "cpu", "cuda" or "cuda:N" (under torchrun on CUDA, each process takes ``LOCAL_RANK``).
        progress: show a progress bar (process 0) with the ETA of the embedding.

    Returns a :class:`ReindexResult` (on every process under torchrun). Bad input raises a
    :class:`errors.TowerrecError` before anything is written.
    """
    t0 = time.time()
    for name, value in (("chunk_size", chunk_size), ("keep_versions", keep_versions), ("batch_size", batch_size),
                        ("num_workers", num_workers)):
        if name == "batch_size" and value is None:
            continue
        least = 0 if name == "num_workers" else 1
        if isinstance(value, bool) or not isinstance(value, int) or value < least:
            raise ConfigError(f"{name} must be a {'non-negative' if least == 0 else 'positive'} integer, "
                              f"got {value!r}")
    if factory is not None and (not isinstance(factory, str) or not factory.strip()):
        raise IndexStateError(f"factory must be a FAISS index_factory string such as 'Flat', 'HNSW32' or "
                              f"'IVF256,Flat', got {factory!r}")
    run = RunDir(run_dir).require()
    _check_index_folder(run.index_root)
    config = run.read_config()
    dev, rank, world, joined = _distributed(resolve_device(device))
    try:
        with _index_lock(run.index_root, enabled=rank == 0):
            return _reindex(run, config, catalog_dir, full, factory, chunk_size, keep_versions,
                            batch_size or config.item.text.batch_size, num_workers, dev, progress, rank, world, t0)
    finally:
        if joined:
            dist.destroy_process_group()


def _reindex(run: RunDir, config, catalog_dir, full, factory, chunk_size, keep_versions, batch_size, num_workers,
             dev, progress, rank, world, t0) -> ReindexResult:
    timings = {}
    catalog_dir, catalog_source = choose_catalog(run, catalog_dir)
    if catalog_dir is not None:
        catalog, digest = load_catalog(catalog_dir), catalog_sha256(catalog_dir)
    else:  # hash-checked against the run's record, so that record is its hash
        catalog, digest = run.load_catalog(), run.catalog_ref()["sha256"]
    catalog_path = Path(catalog.root).resolve()
    logger.info("indexing catalog %s (%s)", catalog_path, catalog_source)
    where = str(Path(catalog.root) / "items.parquet")
    base = _load_base(run.index_root)
    factory = factory or (base.manifest.factory if base is not None else config.index.factory)
    model = load_towers(run, dev)
    fingerprint = item_fingerprint(model)
    id_table = run.read_id_table()
    sources = [_Source(catalog, ItemSpace(catalog.items["item_id"].to_list(), "catalog").to(id_table))]
    training = _training_catalog(run, catalog_dir)
    if training is not None:
        sources.append(_Source(training, ItemSpace(training.items["item_id"].to_list(), "catalog").to(id_table)))
    rows, dropped, incremental = _plan_rows(sources, config, base, fingerprint, full, where)
    searchable = sum(r.searchable for r in rows)
    empty_index(factory, config.dim, searchable)  # a bad factory fails before any work is written
    todo = [r for r in rows if not r.copy]
    mode = "incremental" if incremental else "full"
    counts = _compare(rows, base)
    timings["plan"] = time.time() - t0
    if (mode == "incremental" and not todo and base.manifest.catalog_sha256 == digest
            and base.manifest.catalog_path == str(catalog_path) and base.manifest.factory == factory
            and counts["same_rows"]):
        logger.info("index version %s is up to date", base.folder.name)
        if rank == 0:  # e.g. the work folder of a reindex killed after it went live, before it cleaned up
            for stale in run.index_root.glob(f"{RunDir.REINDEX_WORK}*"):
                _remove_work(stale)
        return ReindexResult(base.folder, "unchanged", len(rows), searchable, 0, len(rows), 0, 0, 0,
                             len(rows) - searchable, dropped, 0, 0, "none", time.time() - t0, timings,
                             catalog=catalog_path, catalog_source=catalog_source)

    key = _plan_key(fingerprint, config.dim, chunk_size, todo, catalog.items["item_id"].dtype)
    work = run.index_root / f"{RunDir.REINDEX_WORK}{key[:16]}"
    chunks = [todo[i:i + chunk_size] for i in range(0, len(todo), chunk_size)]
    if rank == 0:
        _prepare_work(run.index_root, work, key, len(todo), len(chunks), fingerprint)
    _barrier(world)
    if rank > 0 and json.loads((work / RunDir.REINDEX_PLAN).read_text())["key"] != key:
        raise IndexStateError(f"process {rank} planned a different reindex than process 0 (did the catalog "
                              "change while it started?)")

    # Embed this process's chunks (r, r + world, ...), skipping finished ones.
    t1 = time.time()
    mine = list(range(rank, len(chunks), world))
    done = [c for c in mine if _chunk_ok(work / RunDir.REINDEX_CHUNK.format(c), chunks[c], fingerprint,
                                         config.dim) is not None]
    resumed = len(done)
    logger.info("process %d of %d embeds %d of %d chunk(s) (%d already on disk)", rank, world, len(mine),
                len(chunks), len(done))
    embed = _Embedder(model, sources, dev, batch_size, num_workers)
    desc = "embedding items" + (f" (process 0 of {world})" if world > 1 else "")
    with tqdm(total=sum(len(chunks[c]) for c in mine), initial=sum(len(chunks[c]) for c in done), desc=desc,
              unit="item", disable=not progress or rank > 0) as bar:
        for c in mine:
            if c in done:
                continue
            vectors = embed(chunks[c])
            _write_chunk(work / RunDir.REINDEX_CHUNK.format(c), chunks[c], vectors, fingerprint)
            bar.update(len(chunks[c]))
    timings["embed"] = time.time() - t1
    _barrier(world)  # every chunk is on disk

    t2 = time.time()
    if rank == 0:
        folder, update = _publish(run, config, work, chunks, rows, base, fingerprint, factory, digest, mode,
                                  len(todo), keep_versions, meta=catalog.items, catalog_path=catalog_path)
    _barrier(world)  # the new version is live before any process returns
    if rank > 0:
        folder, update = live_version(run.index_root), "n/a"
    timings["publish"] = time.time() - t2
    if world > 1:  # every process reports the plan-wide count of resumed chunks
        total = torch.tensor([resumed], device=dev)
        dist.all_reduce(total)
        resumed = int(total.item())
    return ReindexResult(folder, mode, len(rows), searchable, len(todo), len(rows) - len(todo), counts["added"],
                         counts["edited"], counts["removed"], len(rows) - searchable, dropped, len(chunks), resumed,
                         update, time.time() - t0, timings, catalog=catalog_path, catalog_source=catalog_source)


def _compare(rows: list[_Row], base: _Base | None) -> dict:
    """Added / edited / removed searchable items against the live version, and whether the rows are the same."""
    if base is None:
        return {"added": sum(r.searchable for r in rows), "edited": 0, "removed": 0, "same_rows": False}
    was = {x: bool(s) for x, s in zip(base.items["item_id"].to_list(), base.searchable)}
    now = {r.item_id: r for r in rows}
    added = sum(1 for r in rows if r.searchable and not was.get(r.item_id, False))
    edited = sum(1 for r in rows if r.searchable and was.get(r.item_id, False) and base.hashes is not None
                 and base.hashes[r.base_row] != r.content_hash)
    removed = sum(1 for x, s in was.items() if s and not (x in now and now[x].searchable))
    same = len(rows) == len(was) and all(x in now and now[x].searchable == s for x, s in was.items())
    return {"added": added, "edited": edited, "removed": removed, "same_rows": same}


def _check_index_folder(index_root: Path) -> None:
    """Refuse, before any work, an ``index`` path or ``LIVE`` pointer that a reindex could not write without
    replacing something that is not an index's (a file named ``index``, a folder named ``LIVE``)."""
    if index_root.exists() and not index_root.is_dir():
        raise IndexStateError(f"{index_root}: exists and is not a folder; it is where the run's index versions go: "
                              "move it away")
    live = index_root / RunDir.LIVE
    if live.exists() and not live.is_file():
        raise IndexStateError(f"{live}: exists and is not a file (it should hold the name of the live version "
                              "folder); move it away")


def _remove_work(folder: Path) -> bool:
    """Delete a reindex work folder: only the files a reindex writes there (plan, chunks, their temporary
    files), then the folder if that empties it. Anything else (another name, a symlink, a subfolder) is not a
    reindex's and is left, with a warning. Returns True when the folder is gone."""
    if WORK_NAME.fullmatch(folder.name) is None or folder.is_symlink() or not folder.is_dir():
        logger.warning("leaving %s: not a reindex work folder", folder)
        return False
    for entry in folder.iterdir():
        if WORK_FILE.fullmatch(entry.name) and entry.is_file() and not entry.is_symlink():
            entry.unlink(missing_ok=True)
    try:
        folder.rmdir()
    except OSError:
        logger.warning("leaving %s: it holds files a reindex did not write", folder)
        return False
    return True


def _prepare_work(index_root: Path, work: Path, key: str, items: int, chunks: int, fingerprint: str) -> None:
    """Create (or reopen) the plan's work folder; discard work folders of plans that no longer apply."""
    for other in index_root.glob(f"{RunDir.REINDEX_WORK}*"):
        if other != work and WORK_NAME.fullmatch(other.name) and other.is_dir() and not other.is_symlink():
            logger.info("discarding %s: an interrupted reindex of another plan (the catalog or towers changed)",
                        other.name)
            _remove_work(other)
    if work.is_symlink() or (work.exists() and not work.is_dir()):
        raise IndexStateError(f"{work}: exists and is not a reindex work folder; move it away")
    work.mkdir(parents=True, exist_ok=True)
    for tmp in work.glob(".*.tmp"):  # a chunk being written when a process was killed
        if WORK_FILE.fullmatch(tmp.name) and tmp.is_file():
            tmp.unlink(missing_ok=True)
    plan = work / RunDir.REINDEX_PLAN
    if plan.is_file():
        try:
            if json.loads(plan.read_text()).get("key") == key:
                return
        except (OSError, json.JSONDecodeError):
            pass
    write_durable(plan, lambda tmp: tmp.write_text(json.dumps(
        {"key": key, "items": items, "chunks": chunks, "fingerprint": fingerprint,
         "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}, indent=2)))


def _publish(run: RunDir, config, work: Path, chunks: list[list[_Row]], rows: list[_Row], base: _Base | None,
             fingerprint: str, factory: str, digest: str, mode: str, embedded: int,
             keep_versions: int, meta: pl.DataFrame | None = None,
             catalog_path: Path | None = None) -> tuple[Path, str]:
    """Process 0: check every chunk, assemble the vectors, update or build the index, write and go live.

    ``meta``: the catalog's items table, whose other columns (year, genres, ...) are kept for ``where`` filters.
    ``catalog_path``: the catalog indexed, recorded in the manifest (a plain reindex serves it again).
    """
    if base is not None:
        try:
            live = live_version(run.index_root)
        except IndexStateError:
            live = None
        if live is None or live.name != base.folder.name:
            raise IndexStateError(f"{run.index_root / RunDir.LIVE} moved while reindexing (it was {base.folder.name});"
                                  " run reindex again: the finished chunks are kept")
    dim = config.dim
    vectors = np.zeros((len(rows), dim), dtype=np.float32)
    embedded_rows = [i for i, r in enumerate(rows) if not r.copy]
    parts = []
    for c, want in enumerate(chunks):
        df = _chunk_ok(work / RunDir.REINDEX_CHUNK.format(c), want, fingerprint, dim)
        if df is None:  # a process finished without writing it: never publish a partial index
            raise IndexStateError(f"{work}: chunk {c} is missing after every process finished; run reindex again")
        parts.append(df["vector"].to_numpy())
    if embedded_rows:
        vectors[embedded_rows] = np.concatenate(parts)
    copied = [i for i, r in enumerate(rows) if r.copy]
    if copied:
        vectors[copied] = np.asarray(base.vectors[[rows[i].base_row for i in copied]], dtype=np.float32)

    # Searchable rows first (the new catalog's items), retired rows after: the items-table order.
    order = [i for i, r in enumerate(rows) if r.searchable] + [i for i, r in enumerate(rows) if not r.searchable]
    rows = [rows[i] for i in order]
    vectors = vectors[order]
    ids = pl.Series("item_id", [r.item_id for r in rows])
    items = pl.DataFrame({
        "faiss_id": pl.Series("faiss_id", faiss_ids(ids), dtype=pl.Int64), "item_id": ids,
        "title": pl.Series("title", [r.title for r in rows], dtype=pl.Utf8),
        "text": pl.Series("text", [r.text for r in rows], dtype=pl.Utf8),
        "content_hash": pl.Series("content_hash", [r.content_hash for r in rows], dtype=pl.Utf8),
        "searchable": pl.Series("searchable", [r.searchable for r in rows], dtype=pl.Boolean),
    })
    items = with_metadata(items, meta)
    n = sum(r.searchable for r in rows)
    index, update = _updated_index(base, factory, mode, rows, vectors, items["faiss_id"].to_numpy(), n)
    if index is None:
        index = build_faiss(vectors[:n], items["faiss_id"].to_numpy()[:n], factory, config.index.nprobe,
                            config.index.ef_search)
    set_search_params(index, config.index.nprobe, config.index.ef_search)
    manifest = Manifest(
        fingerprint=fingerprint, dim=dim, metric="ip", count=n, factory=factory,
        created=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), catalog_sha256=digest,
        catalog_path=str(catalog_path) if catalog_path is not None else "", retired=len(rows) - n,
        base=base.folder.name if mode == "incremental" else "", embedded=embedded, mode=mode,
    )
    folder = write_version(run.index_root, index, items, manifest, vectors=vectors,
                           embeddings=embeddings_table(items, vectors, fingerprint))
    _remove_work(work)  # published: nothing left to resume
    prune_versions(run.index_root, keep_versions)
    return folder, update


def with_metadata(items: pl.DataFrame, meta: pl.DataFrame | None) -> pl.DataFrame:
    """``items`` plus the catalog's other item columns (``year``, ``genres``...: what ``where`` filters read),
    matched by item id; null on retired rows, which the catalog no longer has. Media paths are left out."""
    if meta is None:
        return items
    extra = [c for c in meta.columns if c not in set(items.columns) | set(MEDIA_COLUMNS)]
    if not extra:
        return items
    return items.join(meta.select(["item_id", *extra]), on="item_id", how="left", maintain_order="left")


def _updated_index(base: _Base | None, factory: str, mode: str, rows: list[_Row], vectors: np.ndarray,
                   fids: np.ndarray, n: int) -> tuple[faiss.Index | None, str]:
    """The live FAISS index with only the changes applied (remove + add by id), where possible; else
    ``(None, "rebuilt")`` and the caller builds one from the vectors."""
    if mode != "incremental" or base is None or base.manifest.factory != factory:
        return None, "rebuilt"
    try:
        index, _, _ = read_version(base.folder)
    except IndexStateError:
        return None, "rebuilt"
    if not isinstance(index, faiss.IndexIDMap2):
        return None, "rebuilt"
    base_fids = base.items["faiss_id"].to_numpy()
    was = set(base_fids[base.searchable].tolist())
    keep = set()  # searchable now with the same vector as in the live index
    add = []
    for i, r in enumerate(rows[:n]):
        if r.copy and int(fids[i]) in was:
            keep.add(int(fids[i]))
        else:
            add.append(i)
    remove = np.array(sorted(was - keep), dtype=np.int64)
    how = "in-place"
    if not update_index(index, remove, vectors[add], fids[add]):
        logger.info("index type %s cannot remove vectors in place: refilled from the stored vectors, its training "
                    "kept (nothing re-embedded)", factory)
        refill_index(index, vectors[:n], fids[:n])
        how = "refilled"
    if index.ntotal != n:
        raise IndexStateError(f"updated index holds {index.ntotal} vectors, {n} expected")
    return index, how
