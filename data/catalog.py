"""The canonical catalog: two Parquet tables in one folder, validated on write and on load.

``<catalog>/items.parquet``
    ``item_id`` (int or str), ``title`` (str), optional ``text``, ``image_path``, ``audio_path`` (paths
    relative to the catalog folder, null when the item lacks that modality) and any extra columns.
``<catalog>/interactions.parquet``
    ``user_id`` (int or str), ``item_id``, ``timestamp`` (int64 unix seconds), optional ``rating``.
``<catalog>/catalog.json``
    Where the catalog came from and its row counts.

Every validation problem raises :class:`CatalogError` naming the file, row and field.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import polars as pl

from data.atomic import publish_dir, temp_dir
from errors import CatalogError, MediaError

logger = logging.getLogger(__name__)

ITEM_COLUMNS = ("item_id", "title")
OPTIONAL_ITEM_COLUMNS = ("text", "image_path", "audio_path")
INTERACTION_COLUMNS = ("user_id", "item_id", "timestamp")
ITEMS_FILE = "items.parquet"
INTERACTIONS_FILE = "interactions.parquet"
META_FILE = "catalog.json"


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
        return confined_media_path(self.root, relative)


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


def read_table(path: Path, **csv_kwargs) -> pl.DataFrame:
    if not path.exists():
        raise CatalogError(f"{path}: file not found")
    try:
        if path.suffix == ".parquet":
            return pl.read_parquet(path)
        # Everything is read as text; validation decides the types, so "007" keeps its zeros.
        return pl.read_csv(path, infer_schema=False, **csv_kwargs)
    except (pl.exceptions.PolarsError, OSError, UnicodeDecodeError) as err:
        raise CatalogError(f"{path}: cannot be read as a table ({str(err).splitlines()[0]})") from None


def require_columns(df: pl.DataFrame, columns, source: str) -> None:
    missing = [c for c in columns if c not in df.columns]
    if missing:
        raise CatalogError(f"{source}: missing column {missing[0]!r} (columns present: {df.columns})")


def _first_bad_row(mask: pl.Series) -> int:
    """1-based row number of the first True in a boolean mask."""
    return int(mask.arg_true()[0]) + 1


def _parse_timestamps(col: pl.Series, source: str) -> pl.Series:
    if col.dtype.is_integer():
        out = col.cast(pl.Int64)
    elif col.dtype.is_float():
        out = col.cast(pl.Int64, strict=False)
    elif col.dtype == pl.Datetime or col.dtype == pl.Date:
        out = col.cast(pl.Datetime("us")).dt.epoch("s")
    else:
        text = col.cast(pl.Utf8).str.strip_chars()
        out = text.cast(pl.Int64, strict=False)
        if out.null_count() > col.null_count():
            out = out.fill_null(text.cast(pl.Float64, strict=False).cast(pl.Int64, strict=False))
        rest = out.is_null() & text.is_not_null()
        if rest.any():
            try:  # ISO-8601 dates and datetimes; polars raises when no format fits at all
                parsed = text.str.to_datetime(strict=False, time_zone="UTC").dt.epoch("s")
                out = out.fill_null(parsed)
            except pl.exceptions.PolarsError:
                pass
    bad = out.is_null()
    if bad.any():
        row = _first_bad_row(bad)
        raise CatalogError(f"{source} row {row}: unreadable timestamp {col[row - 1]!r} in field 'timestamp'")
    return out.rename("timestamp")


def _normalise_ids(col: pl.Series) -> pl.Series:
    """Integer ids stay integers; anything else becomes a string."""
    if col.dtype.is_integer():
        return col.cast(pl.Int64)
    text = col.cast(pl.Utf8)
    canonical_ints = text.drop_nulls().str.contains(r"^(0|-?[1-9][0-9]{0,17})$").all()
    if len(text.drop_nulls()) and canonical_ints:
        return text.cast(pl.Int64)
    return text  # string ids stay strings, so "007" keeps its zeros


def validate_items(items: pl.DataFrame, source: str, root: Path | None = None) -> pl.DataFrame:
    """Check and normalise an items table; media paths must stay inside ``root``."""
    require_columns(items, ITEM_COLUMNS, source)
    items = items.with_columns(_normalise_ids(items["item_id"]))
    null = items["item_id"].is_null()
    if null.any():
        raise CatalogError(f"{source} row {_first_bad_row(null)}: empty field 'item_id'")
    dup = items["item_id"].is_duplicated()
    if dup.any():
        row = _first_bad_row(dup)
        raise CatalogError(f"{source} row {row}: duplicate item_id {items['item_id'][row - 1]!r}")
    items = items.with_columns(pl.col("title").cast(pl.Utf8).fill_null(""))
    for column in OPTIONAL_ITEM_COLUMNS:
        if column not in items.columns:
            items = items.with_columns(pl.lit(None, dtype=pl.Utf8).alias(column))
        items = items.with_columns(pl.col(column).cast(pl.Utf8))
    for column in ("image_path", "audio_path"):
        for row, rel in enumerate(items[column].to_list(), start=1):
            if rel is None:
                continue
            parts = Path(rel).parts
            if Path(rel).is_absolute() or ".." in parts:
                raise CatalogError(f"{source} row {row}: {column} {rel!r} is outside the catalog folder "
                                   "(media paths are relative, without '..')")
            if root is not None:
                full = root / rel
                if not full.resolve().is_relative_to(root.resolve()):
                    raise CatalogError(f"{source} row {row}: {column} {rel!r} is outside the catalog folder {root}")
                if not full.is_file():
                    raise CatalogError(f"{source} row {row}: {column} {rel!r} does not exist under {root}")
    return items


def validate_interactions(interactions: pl.DataFrame, items: pl.DataFrame, source: str) -> pl.DataFrame:
    """Check and normalise an interactions table against the items it refers to."""
    require_columns(interactions, INTERACTION_COLUMNS, source)
    cols = [
        _normalise_ids(interactions["user_id"]).rename("user_id"),
        interactions["item_id"].cast(items["item_id"].dtype, strict=False).rename("item_id"),
        _parse_timestamps(interactions["timestamp"], source),
    ]
    if "rating" in interactions.columns:
        cols.append(interactions["rating"].cast(pl.Float64, strict=False).rename("rating"))
    out = pl.DataFrame(cols)
    for column in ("user_id", "item_id"):
        null = out[column].is_null()
        if null.any():
            row = _first_bad_row(null)
            raise CatalogError(
                f"{source} row {row}: unreadable {column} {interactions[column][row - 1]!r}"
            )
    unknown = ~out["item_id"].is_in(items["item_id"].implode())
    if unknown.any():
        row = _first_bad_row(unknown)
        raise CatalogError(f"{source} row {row}: item_id {out['item_id'][row - 1]!r} is not in the items table")
    return out


def load_catalog(root: str | Path) -> Catalog:
    """Read and validate a catalog folder written by :func:`write_catalog`."""
    root = Path(root)
    if not root.is_dir():
        raise CatalogError(f"{root}: catalog folder not found (run `towerrec prepare` first)")
    items = validate_items(read_table(root / ITEMS_FILE), str(root / ITEMS_FILE))
    interactions = validate_interactions(read_table(root / INTERACTIONS_FILE), items, str(root / INTERACTIONS_FILE))
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


def write_catalog(
    out: str | Path,
    items: pl.DataFrame,
    interactions: pl.DataFrame,
    media: dict[str, Path] | None = None,
    meta: dict | None = None,
) -> Catalog:
    """Validate and write a catalog atomically: built in a temporary folder, then renamed into place.

    ``media`` maps relative paths (as stored in ``image_path``/``audio_path``) to source files to copy in.
    An existing catalog at ``out`` is replaced only once the new one is complete.
    """
    out = Path(out)
    tmp = temp_dir(out.parent, f".{out.name}-")
    try:
        for rel, src in (media or {}).items():
            dst = tmp / rel
            if Path(rel).is_absolute() or not dst.resolve().is_relative_to(tmp.resolve()):
                raise CatalogError(f"media path {rel!r} is outside the catalog folder")
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(src, dst)
        items = validate_items(items, "items", root=tmp)
        interactions = validate_interactions(interactions, items, "interactions")
        items.write_parquet(tmp / ITEMS_FILE)
        interactions.write_parquet(tmp / INTERACTIONS_FILE)
        info = dict(meta or {}, items=items.height, interactions=interactions.height,
                    users=interactions["user_id"].n_unique())
        (tmp / META_FILE).write_text(json.dumps(info, indent=2))
        publish_dir(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    logger.info("catalog %s: %d items, %d interactions", out, items.height, interactions.height)
    return Catalog(root=out, items=items, interactions=interactions, meta=info)
