"""The canonical catalog: two Parquet tables in one folder, validated on write and on load.

``<catalog>/items.parquet``
    ``item_id`` (int or str), ``title`` (str), optional ``text``, ``image_path``, ``audio_path`` (paths
    relative to the catalog folder, null when the item lacks that modality) and any extra columns.
``<catalog>/interactions.parquet``
    ``user_id`` (int or str), ``item_id``, ``timestamp`` (int64 unix seconds), optional ``rating`` (float64).
``<catalog>/catalog.json``
    Where the catalog came from and its row counts.

Every validation problem raises :class:`CatalogError` (or :class:`MediaError` for a media file) as one line
naming the file, the row (1-based, header excluded) and the field or item id.

What is refused: a table with no rows, a missing column, an empty or duplicate ``item_id`` (the message names
the repeat's row and the first occurrence's), an empty or whitespace-only ``title``, an unreadable
``user_id``/``item_id``, an interaction with an item not in the items table, an unreadable timestamp, a
``rating`` cell that is empty, not a number, NaN or infinite (a catalog either rates every interaction or
has no ``rating`` column), a media path that is absolute, contains ``..`` or resolves outside the catalog
folder (also when a stored catalog is loaded), and, when a catalog is written, a media file that does not
fully decode (see :mod:`data.media`).

How timestamps and ratings are read: :mod:`data.columns`.

Where a catalog is written (:func:`check_catalog_out`): a new path, an empty folder, or, with ``overwrite``
(``prepare --overwrite``), an earlier catalog, replaced all at once. An existing file, a folder holding
anything a catalog does not, and a path that is or holds one of the inputs are always refused.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import polars as pl

from data.atomic import publish_dir, temp_dir
from data.columns import (
    check_column_types,
    first_bad_row,
    parse_ratings,
    parse_timestamps,
    require_columns,
)
from data.ids import as_item_ids, normalise_ids
from data.media import check_audio, check_image
from data.tables import read_table
from data.tombstones import TOMBSTONES_FILE, Tombstones
from errors import CatalogError, MediaError

logger = logging.getLogger(__name__)

ITEM_COLUMNS = ("item_id", "title")
OPTIONAL_ITEM_COLUMNS = ("text", "image_path", "audio_path")
MEDIA_COLUMNS = ("image_path", "audio_path")
INTERACTION_COLUMNS = ("user_id", "item_id", "timestamp")
ITEMS_FILE = "items.parquet"
INTERACTIONS_FILE = "interactions.parquet"
META_FILE = "catalog.json"
MEDIA_DIR = "media"
# Everything a catalog folder may hold, and its kind: what `prepare --overwrite` may replace (see check_catalog_out).
CATALOG_ENTRIES = {ITEMS_FILE: "file", INTERACTIONS_FILE: "file", META_FILE: "file", MEDIA_DIR: "folder",
                   TOMBSTONES_FILE: "file"}


@dataclass(frozen=True)
class Catalog:
    """A loaded catalog: the folder it lives in and its two tables."""

    root: Path
    items: pl.DataFrame
    interactions: pl.DataFrame
    meta: dict = field(default_factory=dict)  # catalog.json: source, counts, protocol hints (tie_break)

    def media_path(self, relative: str | None) -> Path | None:
        """Path of a media file stored relative to the catalog folder (``None`` when the item lacks it).

        The path is confined to the catalog folder when it is read, not only when the catalog was written:
        an absolute path, a ``..`` component or a symlink out of the folder is refused with a
        :class:`MediaError`, so a hand-edited catalog cannot make the engine read arbitrary files.
        """
        if relative is None:
            return None
        return confined_media_path(self.root, relative, where=str(self.root / ITEMS_FILE))


def confined_media_path(root: Path, relative: str, where: str = "") -> Path:
    """``root / relative``, refusing absolute paths, ``..`` and anything that resolves outside ``root``."""
    rel = Path(relative)
    if rel.is_absolute() or ".." in rel.parts:
        raise MediaError(f"{where or root}: media path {relative!r} must be relative to the catalog folder, "
                         "without '..'")
    full = root / rel
    if not full.resolve().is_relative_to(root.resolve()):
        raise MediaError(f"{where or root}: media path {relative!r} resolves outside the catalog folder {root}")
    return full


def validate_items(items: pl.DataFrame, source: str, root: Path | None = None,
                   require_files: bool = True, root_name: str | Path | None = None) -> pl.DataFrame:
    """Check and normalise an items table.

    With ``root``, media paths must resolve inside ``root`` (symlinks included) and, with ``require_files``,
    name existing files. Without it only their form is checked (relative, no ``..``). ``root_name`` is how
    messages name ``root`` (the catalog being written, not the temporary folder it is built in).
    """
    require_columns(items, ITEM_COLUMNS, source)
    check_column_types(items, (*ITEM_COLUMNS, *OPTIONAL_ITEM_COLUMNS), source)
    if items.height == 0:
        raise CatalogError(f"{source}: no rows (the items table needs at least one item)")
    items = items.with_columns(normalise_ids(items["item_id"]))
    null = items["item_id"].is_null()
    if null.any():
        raise CatalogError(f"{source} row {first_bad_row(null)}: empty field 'item_id'")
    repeat = ~items["item_id"].is_first_distinct()
    if repeat.any():
        row = first_bad_row(repeat)
        item_id = items["item_id"][row - 1]
        first = first_bad_row(items["item_id"] == item_id)
        raise CatalogError(f"{source} row {row}: duplicate item_id {item_id!r}: row {row} repeats row {first} "
                           "(field 'item_id')")
    items = items.with_columns(pl.col("title").cast(pl.Utf8))
    blank = items["title"].is_null() | (items["title"].str.strip_chars() == "")
    if blank.any():
        raise CatalogError(f"{source} row {first_bad_row(blank.fill_null(True))}: empty field 'title' (every item "
                           "needs a title)")
    for column in OPTIONAL_ITEM_COLUMNS:
        if column not in items.columns:
            items = items.with_columns(pl.lit(None, dtype=pl.Utf8).alias(column))
        items = items.with_columns(pl.col(column).cast(pl.Utf8))
    for column in MEDIA_COLUMNS:  # an empty media cell means the item lacks that modality, like a null
        items = items.with_columns(pl.when(pl.col(column).str.strip_chars() != "").then(pl.col(column)))
    shown = root_name if root_name is not None else root
    for column in MEDIA_COLUMNS:
        for row, rel in enumerate(items[column].to_list(), start=1):
            if rel is None:
                continue
            where = f"{source} row {row}: {column} {rel!r}"
            if "\0" in rel:
                raise CatalogError(f"{where} holds a NUL character, which no file name can")
            parts = Path(rel).parts
            if Path(rel).is_absolute() or ".." in parts:
                raise CatalogError(f"{where} is outside the catalog folder (media paths are relative, without '..')")
            if root is not None:
                full = root / rel
                try:
                    if not full.resolve().is_relative_to(root.resolve()):
                        raise CatalogError(f"{where} is outside the catalog folder {shown}")
                    if require_files and not full.is_file():
                        raise CatalogError(f"{where} {not_a_file(full, shown)}")
                except OSError as err:  # a name too long for the file system
                    raise CatalogError(f"{where} cannot be looked up under {shown} ({err.strerror})") from None
    return items


def not_a_file(path: Path, root: str | Path) -> str:
    """Why ``path`` (under ``root``) cannot be read as a media file, for an error message: a folder, or missing."""
    return f"is a folder under {root}, not a file" if path.is_dir() else f"does not exist under {root}"


def validate_interactions(interactions: pl.DataFrame, items: pl.DataFrame, source: str,
                          stored: bool = False) -> pl.DataFrame:
    """Check and normalise an interactions table against the items it refers to.

    ``stored``: the table comes from a written catalog, whose integer timestamps are unix seconds already; they
    are not scaled again (a date after 5138 would otherwise read as milliseconds on load).
    """
    require_columns(interactions, INTERACTION_COLUMNS, source)
    check_column_types(interactions, (*INTERACTION_COLUMNS, "rating"), source)
    if interactions.height == 0:
        raise CatalogError(f"{source}: no rows (the interactions table needs at least one interaction)")
    cols = [
        normalise_ids(interactions["user_id"]).rename("user_id"),
        as_item_ids(interactions["item_id"], items["item_id"].dtype).rename("item_id"),
        parse_timestamps(interactions["timestamp"], source, stored),
    ]
    if "rating" in interactions.columns:
        cols.append(parse_ratings(interactions["rating"], source))
    out = pl.DataFrame(cols)
    for column in ("user_id", "item_id"):
        null = out[column].is_null()
        if null.any():
            row = first_bad_row(null)
            value = interactions[column][row - 1]
            if value is None or (isinstance(value, str) and not value.strip()):
                raise CatalogError(f"{source} row {row}: empty field {column!r}")
            raise CatalogError(f"{source} row {row}: unreadable {column} {value!r}")
    unknown = ~out["item_id"].is_in(items["item_id"].implode())
    if unknown.any():
        row = first_bad_row(unknown)
        raise CatalogError(f"{source} row {row}: item_id {out['item_id'][row - 1]!r} is not in the items table")
    return out


def load_catalog(root: str | Path, tombstones: Tombstones | None = None) -> Catalog:
    """Read and validate a catalog folder written by :func:`write_catalog`.

    The interactions of users erased from it (its ``tombstones.json``), or in ``tombstones`` (a run's list),
    are dropped: an erased user never reaches training, evaluation or an index, whatever the tables hold.
    """
    root = Path(root)
    if not root.is_dir():
        raise CatalogError(f"{root}: catalog folder not found (run `towerrec prepare` first)")
    # Media paths are confined here too (a hand-edited items.parquet must not point the engine at
    # /etc/passwd); a missing file is left to decoding time, which names it.
    items = validate_items(read_table(root / ITEMS_FILE), str(root / ITEMS_FILE), root=root, require_files=False)
    interactions = validate_interactions(read_table(root / INTERACTIONS_FILE), items, str(root / INTERACTIONS_FILE),
                                         stored=True)
    erased = Tombstones.of(root).update(tombstones or Tombstones())
    interactions, dropped = erased.drop_users(interactions)
    if dropped:
        logger.info("%s: %d interactions of erased users dropped", root, dropped)
        if interactions.height == 0:
            raise CatalogError(f"{root / INTERACTIONS_FILE}: no interactions left once erased users are dropped")
    meta_path = root / META_FILE
    meta = json.loads(meta_path.read_text()) if meta_path.is_file() else {}
    return Catalog(root=root, items=items, interactions=interactions, meta=meta)


def catalog_sha256(root: str | Path) -> str:
    """Hash of a catalog's two tables: which data a run was trained on, or an index was built from."""
    h = hashlib.sha256()
    for name in (ITEMS_FILE, INTERACTIONS_FILE):
        path = Path(root) / name
        if not path.is_file():
            raise CatalogError(f"{path}: file not found (run `towerrec prepare` first)")
        with path.open("rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()


def check_media(items: pl.DataFrame, root: Path, source: str, media: dict[str, Path] | None = None) -> int:
    """Decode every image and audio file an items table names, completely; returns how many were checked.

    Paths are relative to ``root``; ``media`` maps some of them to the source files they were copied from,
    which is the file an error names (the one the user can fix). The first failure raises a
    :class:`MediaError` naming ``source``, the row, the item id, the column and the file.
    """
    checkers = {"image_path": check_image, "audio_path": check_audio}
    media = media or {}
    seen: set[Path] = set()  # one file shared by several items is decoded once
    start = time.perf_counter()
    for column, check in checkers.items():
        rows = items.select("item_id", column).iter_rows()
        for row, (item_id, rel) in enumerate(rows, start=1):
            if rel is None:
                continue
            path = Path(media.get(rel, root / rel))
            if path in seen:
                continue
            try:
                check(path)
            except MediaError as err:
                raise MediaError(f"{source} row {row}: item_id {item_id!r}, field {column!r}: {err}") from None
            seen.add(path)
    logger.info("decoded %d media files in %.1f s", len(seen), time.perf_counter() - start)
    return len(seen)


def _foreign_entries(path: Path) -> list[str]:
    """Names in the folder ``path`` that a catalog does not write (sorted): see :func:`check_catalog_out`."""
    foreign = []
    for entry in path.iterdir():
        kind = CATALOG_ENTRIES.get(entry.name)
        ok = (kind == "file" and entry.is_file()) or (kind == "folder" and entry.is_dir())
        if not ok:
            foreign.append(entry.name)
    return sorted(foreign)


def check_catalog_out(out: str | Path, overwrite: bool = False,
                      inputs: Iterable[tuple[str, str | Path]] = ()) -> Path:
    """Refuse a catalog destination whose contents would be lost; returns the real path to publish to.

    A catalog is published by renaming a complete folder onto ``out`` (:func:`data.atomic.publish_dir`),
    which removes whatever was there. So, with a :class:`CatalogError` naming ``out``:

    - an existing file (or a link to one) is always refused: a file is never replaced by a catalog folder;
    - a folder holding anything but a catalog (``items.parquet``, ``interactions.parquet``, optional
      ``catalog.json`` and ``media/``, and nothing else, hidden files included) is always refused, even with
      ``overwrite``: those files are the user's;
    - an earlier catalog is replaced only with ``overwrite`` (``--overwrite``), all at once;
    - ``out`` may not be, or contain, any of ``inputs`` (``(what, path)`` pairs such as ``("--items", path)``
      or media source files): replacing it would delete the data being read.

    A missing ``out`` or an empty folder is fine. A symbolic link at ``out`` is followed, so the folder it points
    to is the one replaced and the link keeps working.
    """
    given = Path(out)
    target = Path(os.path.realpath(given))
    if target.parent == target:
        raise CatalogError(f"{given}: a filesystem root cannot be a catalog folder; choose a new folder")
    for ancestor in target.parents:
        if ancestor.exists():
            if not ancestor.is_dir():
                raise CatalogError(f"{given}: cannot create a catalog there: {ancestor} is a file, not a folder")
            break
    for what, path in inputs:
        source = Path(os.path.realpath(path))
        if source == target or source.is_relative_to(target):
            role = "is" if source == target else f"holds {path},"
            raise CatalogError(f"{given}: {role} the {what} input, which a catalog written there would replace; "
                               "choose a new or empty folder for --out")
    if not target.exists():
        return target
    if not target.is_dir():
        raise CatalogError(f"{given}: is an existing file, and prepare never replaces a file; choose a new or "
                           "empty folder for --out")
    if not any(target.iterdir()):
        return target
    foreign = _foreign_entries(target)
    if foreign or not ((target / ITEMS_FILE).is_file() and (target / INTERACTIONS_FILE).is_file()):
        names = foreign or [name for name in CATALOG_ENTRIES if (target / name).exists()]
        shown = ", ".join(repr(n) for n in names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
        raise CatalogError(f"{given}: holds files that are not a towerrec catalog ({shown}); prepare never "
                           "deletes them, even with --overwrite; choose a new or empty folder for --out")
    if not overwrite:
        raise CatalogError(f"{given}: already holds a catalog; pass --overwrite to replace it, or choose a new or "
                           "empty folder for --out")
    return target


def write_catalog(
    out: str | Path,
    items: pl.DataFrame,
    interactions: pl.DataFrame,
    media: dict[str, Path] | None = None,
    meta: dict | None = None,
    *,
    items_source: str = "items",
    interactions_source: str = "interactions",
    overwrite: bool = False,
    inputs: Iterable[tuple[str, str | Path]] = (),
    tombstones: Tombstones | None = None,
) -> Catalog:
    """Validate and write a catalog atomically: built in a temporary folder beside ``out``, then renamed into place.

    ``media`` maps relative paths (as stored in ``image_path``/``audio_path``) to source files to copy in.
    Every media file is decoded once, completely (:func:`check_media`), so a corrupt or truncated one is
    refused here rather than half-way through training. ``items_source`` and ``interactions_source`` name the
    tables in error messages (importers pass the files they read).

    ``out`` must be new, an empty folder, or, with ``overwrite``, an earlier catalog (see
    :func:`check_catalog_out`, which also keeps ``out`` off ``inputs`` and the media source files). The check
    runs before any work and again just before publishing. An earlier catalog is replaced only once the new one
    is complete: an error or an interruption before that leaves it as it was.

    Users erased from the catalog being replaced (its ``tombstones.json``) or in ``tombstones`` are dropped from
    ``interactions``, and the new catalog keeps both lists: an erased user never comes back with an import.
    """
    media = media or {}
    out = Path(out)
    guard = [*inputs, *(("media file", src) for src in media.values())]
    target = check_catalog_out(out, overwrite, guard)
    try:
        tmp = temp_dir(target.parent, f".{target.name}-")
    except OSError as err:
        raise CatalogError(f"{out}: cannot create the catalog folder ({err})") from None
    try:
        for rel, src in media.items():
            dst = tmp / rel
            if Path(rel).is_absolute() or not dst.resolve().is_relative_to(tmp.resolve()):
                raise CatalogError(f"media path {rel!r} is outside the catalog folder")
            try:
                dst.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(src, dst)
            except OSError as err:
                raise MediaError(f"{src}: cannot copy into the catalog as {rel!r} ({err})") from None
        items = validate_items(items, items_source, root=tmp, root_name=out)
        interactions = validate_interactions(interactions, items, interactions_source)
        erased = Tombstones.of(target) if target.is_dir() else Tombstones()
        erased.update(tombstones or Tombstones())
        interactions, dropped = erased.drop_users(interactions)
        if dropped:
            logger.warning("%s: dropped %d interactions of %d erased users (tombstones)", interactions_source,
                           dropped, len(erased))
        if interactions.height == 0:
            raise CatalogError(f"{interactions_source}: no interactions left once erased users are dropped")
        # After the tables: a wrong column is reported before thousands of files are decoded.
        check_media(items, tmp, items_source, media)
        info = dict(meta or {}, items=items.height, interactions=interactions.height,
                    users=interactions["user_id"].n_unique())
        try:
            items.write_parquet(tmp / ITEMS_FILE)
            interactions.write_parquet(tmp / INTERACTIONS_FILE)
            (tmp / META_FILE).write_text(json.dumps(info, indent=2))
            erased.write(tmp)
        except (OSError, pl.exceptions.PolarsError) as err:
            raise CatalogError(f"{out}: cannot write the catalog ({str(err).splitlines()[0]})") from None
        check_catalog_out(out, overwrite, guard)  # the folder may have gained files while this one was built
        try:
            publish_dir(tmp, target)
        except OSError as err:
            raise CatalogError(f"{out}: cannot put the catalog in place ({err})") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    logger.info("catalog %s: %d items, %d interactions", out, items.height, interactions.height)
    return Catalog(root=out, items=items, interactions=interactions, meta=info)
