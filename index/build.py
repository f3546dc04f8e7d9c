"""Embed a catalog with a run's item tower and write a new FAISS index version (a full :mod:`index.reindex`)."""

from __future__ import annotations

import logging
from pathlib import Path

from data.rundir import RunDir
from index.reindex import CHUNK_SIZE, KEEP_VERSIONS, ReindexResult, reindex

logger = logging.getLogger(__name__)


def build_index(run_dir: str | Path, catalog_dir: str | Path | None = None, factory: str | None = None,
                batch_size: int | None = None, num_workers: int = 0, device: str = "auto",
                progress: bool = True, keep_versions: int = KEEP_VERSIONS, chunk_size: int = CHUNK_SIZE) -> Path:
    """Embed every item of the catalog and write a new live index version; returns its folder.

    The catalog is ``catalog_dir``, else the one the live version was built from, else (no index yet) the
    run's training catalog, hash-checked (see :func:`index.plan.choose_catalog`). Items that were not in
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
