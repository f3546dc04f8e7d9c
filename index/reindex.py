"""Rebuild the item embeddings after a retrain or a catalog change, and publish them as a new index version.

``reindex(run_dir, catalog_dir)`` compares what the new version must hold with the live version:

- **the item tower changed** (its fingerprint differs from the live manifest's), there is no usable live
  version, or ``full=True``: every item is embedded again and the FAISS index is built afresh;
- **only the catalog changed**: items that are new, or whose content changed, are embedded; the rest are
  copied from the live version, whose FAISS index is updated in place (remove and add by stable 64-bit id)
  where the index type allows it (HNSW cannot remove: it is rebuilt from the stored vectors, still without
  re-embedding anything). "Content" is what the item tower reads, hashed per item (:func:`index.plan.content_hashes`):
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

import json
import logging
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

import faiss
import numpy as np
import polars as pl
import torch
import torch.distributed as dist

from data.catalog import ITEMS_FILE, MEDIA_COLUMNS, catalog_sha256, load_catalog
from data.ids import ItemSpace, faiss_ids
from data.rundir import RunDir
from data.tombstones import Tombstones
from errors import ConfigError, IndexStateError
from index.plan import (
    _barrier,
    _Base,
    _chunk_ok,
    _distributed,
    _Embedder,
    _index_lock,
    _load_base,
    _plan_key,
    _plan_rows,
    _Row,
    _Source,
    _training_catalog,
    _write_chunk,
    choose_catalog,
)
from index.store import (
    Manifest,
    build_faiss,
    embeddings_table,
    empty_index,
    live_version,
    prune_versions,
    read_version,
    refill_index,
    set_search_params,
    update_index,
    write_durable,
    write_version,
)
from towers.device import resolve_device
from towers.factory import item_fingerprint, load_towers
from towers.progress import tqdm

logger = logging.getLogger(__name__)

CHUNK_SIZE = 1024  # items per resumable chunk
KEEP_VERSIONS = 3  # index versions kept by default (the live one plus two a reader may still hold)
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
def reindex(run_dir: str | Path, catalog_dir: str | Path | None = None, *, full: bool = False,
            factory: str | None = None, chunk_size: int = CHUNK_SIZE, keep_versions: int = KEEP_VERSIONS,
            batch_size: int | None = None, num_workers: int = 0, device: str = "auto",
            progress: bool = True) -> ReindexResult:
    """Bring the run's index up to date with its towers and a catalog, embedding only what changed.

    Args:
        run_dir: a trained run (see :class:`data.rundir.RunDir`).
        catalog_dir: the catalog to serve (default: the one the live version was built from, recorded in its
            manifest; with no index version yet, the one the run was trained on, hash-checked). See
            :func:`index.plan.choose_catalog`; the result says which was used and why.
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
        catalog, digest = load_catalog(catalog_dir, Tombstones.of(run.path)), catalog_sha256(catalog_dir)
    else:  # hash-checked against the run's record, so that record is its hash
        catalog, digest = run.load_catalog(), run.catalog_ref()["sha256"]
    catalog_path = Path(catalog.root).resolve()
    logger.info("indexing catalog %s (%s)", catalog_path, catalog_source)
    where = str(Path(catalog.root) / ITEMS_FILE)
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
