"""Erase a user (the right to erasure): ``towerrec forget --run RUN --user ID [--catalog DIR]``.

What :func:`forget` removes, in this order (each step atomic, so an interruption leaves the user erased from
what was done and still honoured by the tombstones written first):

1. the catalog's tombstone list and the run's gain the user's salted hash (:mod:`data.tombstones`);
2. the catalog: a new version of the folder without the user's interactions replaces the old one whole
   (``catalog.json`` records the change by content hashes only, so runs trained on the old version can follow it);
3. the run: its serving histories (``histories.parquet``) lose the user, its catalog record names the new
   catalog version, and a saved resumable training state (``.<run>.resume.pt``, which holds training windows
   cut from every user's history) is deleted.

A run keeps no other per-user data: reranker and reasons adapters keep weights and aggregate validation
figures, and index versions hold items only. What stays is what the weights learned while the user was
present: a new ``train --catalog CATALOG --run NEW`` (from the pretrained backbones, not ``--resume-from``,
which starts from these weights) trains without them. A serving process drops the user at its next reload
(``serve`` checks every ``--poll`` seconds).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

import polars as pl

from data.atomic import publish_dir, temp_dir, write_parquet, write_text
from data.catalog import INTERACTIONS_FILE, ITEMS_FILE, META_FILE, catalog_sha256
from data.ids import id_forms
from data.rundir import RunDir
from data.tables import read_table
from data.tombstones import TOMBSTONES_FILE, Tombstones
from errors import CatalogError, QueryError

logger = logging.getLogger(__name__)

ERASURES = "erasures"  # catalog.json: [{"from": sha256 before, "to": sha256 after}, ...]


def _matches(column: pl.Series, user_id) -> pl.Series:
    """Rows of ``column`` holding ``user_id`` in any of its forms (``"7"`` and ``7`` are one user)."""
    forms = [f for f in id_forms(user_id) if isinstance(f, str) != column.dtype.is_integer()]
    if not forms:
        return pl.repeat(False, len(column), eager=True)
    return column.is_in(pl.Series(forms, dtype=column.dtype).implode())


def _link_tree(src: Path, dst: Path) -> None:
    """``dst`` as a copy of folder ``src`` made of hard links (a copy where linking fails): no media bytes move."""
    def link(a: str, b: str) -> None:
        try:
            os.link(a, b)
        except OSError:
            shutil.copy2(a, b)
    shutil.copytree(src, dst, copy_function=link)


def forget_in_catalog(root: Path, user_id) -> tuple[int, str, str]:
    """Publish a new version of catalog ``root`` without ``user_id``'s interactions, its hash in the tombstone
    list; returns (rows removed, sha256 before, sha256 after)."""
    erased = Tombstones.of(root)
    erased.add(user_id)
    erased.write(root)  # first: from here on every load drops the user
    table = read_table(root / INTERACTIONS_FILE)
    gone = _matches(table["user_id"], user_id)
    before = catalog_sha256(root)
    if not gone.any():
        return 0, before, before
    tmp = temp_dir(root.parent, f".{root.name}-forget-")
    try:
        for entry in root.iterdir():
            if entry.name in (INTERACTIONS_FILE, META_FILE, TOMBSTONES_FILE) or entry.name.startswith("."):
                continue
            if entry.is_dir() and not entry.is_symlink():
                _link_tree(entry, tmp / entry.name)
            elif entry.is_file():
                os.link(entry, tmp / entry.name)
        kept = table.filter(~gone)
        if kept.height == 0:
            raise CatalogError(f"{root / INTERACTIONS_FILE}: user {user_id!r} holds every interaction; a catalog "
                               "without interactions cannot be written (delete the catalog instead)")
        kept.write_parquet(tmp / INTERACTIONS_FILE)
        erased.write(tmp)
        after = catalog_sha256(tmp)
        meta_path = root / META_FILE
        meta = json.loads(meta_path.read_text()) if meta_path.is_file() else {}
        meta.update(interactions=kept.height, users=kept["user_id"].n_unique())
        meta[ERASURES] = [*meta.get(ERASURES, []), {"from": before, "to": after}]
        (tmp / META_FILE).write_text(json.dumps(meta, indent=2))
        publish_dir(tmp, root)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return int(gone.sum()), before, after


def follows_erasures(root: Path, recorded: str) -> bool:
    """True when catalog ``root`` differs from the version hashed ``recorded`` by erasures alone."""
    meta_path = root / META_FILE
    steps = {}
    if meta_path.is_file():
        steps = {e["from"]: e["to"] for e in json.loads(meta_path.read_text()).get(ERASURES, [])}
    current, sha, seen = catalog_sha256(root), recorded, set()
    while sha != current and sha in steps and sha not in seen:
        seen.add(sha)
        sha = steps[sha]
    return sha == current


def forget(run_dir: str | Path, user_id, catalog_dir: str | Path | None = None) -> dict:
    """Erase ``user_id`` from run ``run_dir`` and its catalog (``catalog_dir``: where the catalog is now, when it
    moved); see the module docstring. A user neither the run nor the catalog knows is a :class:`QueryError`
    (nothing is written). Returns what was removed."""
    run = RunDir(run_dir).require()
    ref = run.catalog_ref()
    root = Path(catalog_dir) if catalog_dir is not None else Path(ref["path"])
    if not (root / ITEMS_FILE).is_file():
        raise CatalogError(f"{root}: the catalog of run {run.path} is not there; give its location with --catalog")
    hist_path = run.path / RunDir.HISTORIES
    histories = read_table(hist_path)
    in_run = _matches(histories["user_id"], user_id)
    in_catalog = _matches(read_table(root / INTERACTIONS_FILE)["user_id"], user_id)
    if not in_run.any() and not in_catalog.any():
        raise QueryError(f"user {user_id!r}: not in run {run.path} nor in catalog {root} (erased already, or "
                         "never there)")
    catalog_followed = follows_erasures(root, ref["sha256"])  # before: the new version is reached by erasure
    erased = Tombstones.of(run.path).update(Tombstones.of(root))
    erased.add(user_id)
    erased.write(run.path)
    rows, _, after = forget_in_catalog(root, user_id)
    if in_run.any():
        write_parquet(histories.filter(~in_run), hist_path)
    if catalog_followed:
        write_text(run.path / RunDir.CATALOG_REF, json.dumps({"path": str(root.resolve()), "sha256": after},
                                                             indent=2))
    else:
        logger.warning("run %s: its catalog record is left as it was (catalog %s changed since training by more "
                       "than erasures); retrain on the catalog", run.path, root)
    resume = run.resume_path.is_file()
    run.resume_path.unlink(missing_ok=True)
    logger.info("forgot user %r: %d catalog interactions, %d history rows", user_id, rows, int(in_run.sum()))
    return {"user_id": user_id, "run": str(run.path), "catalog": str(root), "catalog_interactions": rows,
            "history_rows": int(in_run.sum()), "resume_state_removed": resume, "catalog_record": catalog_followed}
