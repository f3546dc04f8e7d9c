"""The canonical catalog: two Parquet tables in one folder, plus the importers that build it.

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

import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import polars as pl

logger = logging.getLogger(__name__)

ITEM_COLUMNS = ("item_id", "title")
OPTIONAL_ITEM_COLUMNS = ("text", "image_path", "audio_path")
INTERACTION_COLUMNS = ("user_id", "item_id", "timestamp")


class CatalogError(ValueError):
    """Bad input data. The message names the file, the row (1-based, header excluded) and the field."""


@dataclass(frozen=True)
class Catalog:
    """A loaded catalog: the folder it lives in and its two tables."""

    root: Path
    items: pl.DataFrame
    interactions: pl.DataFrame
    meta: dict = field(default_factory=dict)  # catalog.json: source, counts, protocol hints (tie_break)

    def media_path(self, relative: str | None) -> Path | None:
        """Absolute path of a media file stored relative to the catalog folder."""
        return None if relative is None else self.root / relative


def _read_table(path: Path, **csv_kwargs) -> pl.DataFrame:
    if not path.exists():
        raise CatalogError(f"{path}: file not found")
    try:
        if path.suffix == ".parquet":
            return pl.read_parquet(path)
        # Everything is read as text; validation decides the types, so "007" keeps its zeros.
        return pl.read_csv(path, infer_schema=False, **csv_kwargs)
    except (pl.exceptions.PolarsError, OSError, UnicodeDecodeError) as err:
        raise CatalogError(f"{path}: cannot be read as a table ({str(err).splitlines()[0]})") from None


def _require(df: pl.DataFrame, columns, source: str) -> None:
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
    _require(items, ITEM_COLUMNS, source)
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
    if root is not None:
        resolved_root = root.resolve()
        for column in ("image_path", "audio_path"):
            for row, rel in enumerate(items[column].to_list(), start=1):
                if rel is None:
                    continue
                full = (root / rel).resolve()
                if Path(rel).is_absolute() or not full.is_relative_to(resolved_root):
                    raise CatalogError(
                        f"{source} row {row}: {column} {rel!r} is outside the catalog folder {root}"
                    )
                if not full.is_file():
                    raise CatalogError(f"{source} row {row}: {column} {rel!r} does not exist under {root}")
    return items


def validate_interactions(interactions: pl.DataFrame, items: pl.DataFrame, source: str) -> pl.DataFrame:
    """Check and normalise an interactions table against the items it refers to."""
    _require(interactions, INTERACTION_COLUMNS, source)
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
    items = validate_items(_read_table(root / "items.parquet"), str(root / "items.parquet"))
    interactions = validate_interactions(
        _read_table(root / "interactions.parquet"), items, str(root / "interactions.parquet")
    )
    meta_path = root / "catalog.json"
    meta = json.loads(meta_path.read_text()) if meta_path.is_file() else {}
    return Catalog(root=root, items=items, interactions=interactions, meta=meta)


def catalog_sha256(root: str | Path) -> str:
    """Hash of a catalog's two tables: which data a run was trained on, or an index was built from."""
    import hashlib

    h = hashlib.sha256()
    for name in ("items.parquet", "interactions.parquet"):
        h.update((Path(root) / name).read_bytes())
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
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    try:
        for rel, src in (media or {}).items():
            dst = tmp / rel
            if Path(rel).is_absolute() or not dst.resolve().is_relative_to(tmp.resolve()):
                raise CatalogError(f"media path {rel!r} is outside the catalog folder")
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(src, dst)
        items = validate_items(items, "items", root=tmp)
        interactions = validate_interactions(interactions, items, "interactions")
        items.write_parquet(tmp / "items.parquet")
        interactions.write_parquet(tmp / "interactions.parquet")
        info = dict(meta or {}, items=items.height, interactions=interactions.height,
                    users=interactions["user_id"].n_unique())
        (tmp / "catalog.json").write_text(json.dumps(info, indent=2))
        if out.exists():
            old = out.with_name(f".{out.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(out, old)
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    logger.info("catalog %s: %d items, %d interactions", out, items.height, interactions.height)
    return Catalog(root=out, items=items, interactions=interactions, meta=info)


def prepare_generic(
    items_path: str | Path,
    interactions_path: str | Path,
    out: str | Path,
    mapping: dict[str, str] | None = None,
    media_root: str | Path | None = None,
    drop_unknown_items: bool = False,
) -> Catalog:
    """Build a catalog from any CSV/Parquet pair.

    ``mapping`` renames source columns to canonical ones, e.g. ``{"movieId": "item_id"}``. Media paths in the
    items table are relative to ``media_root`` (default: the items file's folder) and are copied into the
    catalog under ``media/``; a path that escapes ``media_root`` is an error.
    """
    items_path, interactions_path = Path(items_path), Path(interactions_path)
    mapping = mapping or {}
    items = _read_table(items_path)
    interactions = _read_table(interactions_path)
    items = items.rename({k: v for k, v in mapping.items() if k in items.columns})
    interactions = interactions.rename({k: v for k, v in mapping.items() if k in interactions.columns})
    _require(items, ITEM_COLUMNS, str(items_path))
    _require(interactions, INTERACTION_COLUMNS, str(interactions_path))
    src_root = Path(media_root) if media_root else items_path.parent
    media: dict[str, Path] = {}
    for column in ("image_path", "audio_path"):
        if column not in items.columns:
            continue
        new = []
        for row, rel in enumerate(items[column].cast(pl.Utf8).to_list(), start=1):
            if rel is None or rel == "":
                new.append(None)
                continue
            full = (src_root / rel).resolve()
            if Path(rel).is_absolute() or not full.is_relative_to(src_root.resolve()):
                raise CatalogError(f"{items_path} row {row}: {column} {rel!r} is outside the media folder {src_root}")
            if not full.is_file():
                raise CatalogError(f"{items_path} row {row}: {column} {rel!r} does not exist under {src_root}")
            target = f"media/{Path(rel).as_posix()}"
            media[target] = full
            new.append(target)
        items = items.with_columns(pl.Series(column, new, dtype=pl.Utf8))
    items = validate_items(items, str(items_path))
    if drop_unknown_items:
        keep = interactions["item_id"].cast(items["item_id"].dtype, strict=False).is_in(items["item_id"].implode())
        dropped = int((~keep).sum())
        if dropped:
            logger.info("dropping %d interactions with items missing from %s", dropped, items_path)
        interactions = interactions.filter(keep)
    interactions = validate_interactions(interactions, items, str(interactions_path))
    return write_catalog(out, items, interactions, media, meta={"source": str(items_path)})


def _genres_from_flags(df: pl.DataFrame, names: list[str]) -> pl.Series:
    flags = df.select(names).to_numpy()
    return pl.Series("genres", [", ".join(n for n, f in zip(names, row) if f) for row in flags], dtype=pl.Utf8)


def prepare_movielens_100k(src: str | Path, out: str | Path) -> Catalog:
    """Import MovieLens-100K (``u.data``, ``u.item``) plus TMDB ``tmdb/items.csv`` and ``posters/<id>.jpg``."""
    src = Path(src)
    for name in ("u.data", "u.item"):
        if not (src / name).exists():
            raise CatalogError(f"{src / name}: file not found (expected the MovieLens-100K release here)")
    genre_names = ["unknown", "Action", "Adventure", "Animation", "Children", "Comedy", "Crime", "Documentary",
                   "Drama", "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery", "Romance", "Sci-Fi",
                   "Thriller", "War", "Western"]
    uitem = pl.read_csv(
        src / "u.item", separator="|", has_header=False, encoding="latin1", quote_char=None,
        new_columns=["item_id", "title", "release", "video", "imdb", *genre_names],
        schema_overrides={"item_id": pl.Int64},
    )
    items = uitem.select("item_id", "title").with_columns(_genres_from_flags(uitem, genre_names))
    tmdb_path = src / "tmdb" / "items.csv"
    if tmdb_path.exists():
        tmdb = _read_table(tmdb_path).select(
            pl.col("movie_id").cast(pl.Int64).alias("item_id"),
            pl.col("overview").cast(pl.Utf8).alias("text"),
            pl.col("year").cast(pl.Float64, strict=False).fill_nan(None).cast(pl.Int64).alias("year"),
        ).unique("item_id", keep="first")
        items = items.join(tmdb, on="item_id", how="left")
    media: dict[str, Path] = {}
    paths = []
    for item_id in items["item_id"].to_list():
        poster = src / "posters" / f"{item_id}.jpg"
        if poster.exists():
            rel = f"media/posters/{item_id}.jpg"
            media[rel] = poster
            paths.append(rel)
        else:
            paths.append(None)
    items = items.with_columns(pl.Series("image_path", paths, dtype=pl.Utf8))
    udata = pl.read_csv(
        src / "u.data", separator="\t", has_header=False,
        new_columns=["user_id", "item_id", "rating", "timestamp"],
    )
    # Equal timestamps keep u.data's row order (a stable sort), as in the RecBole runs the README compares to.
    return write_catalog(out, items, udata, media,
                         meta={"source": str(src), "dataset": "movielens-100k", "tie_break": "input_order"})


def prepare_movielens_latest(src: str | Path, out: str | Path) -> Catalog:
    """Import MovieLens latest-small (``ratings.csv`` + ``movies.csv``), text only.

    As in LlamaRec's protocol, ratings of movies missing from ``movies.csv`` are dropped.
    """
    src = Path(src)
    movies = _read_table(src / "movies.csv")
    ratings = _read_table(src / "ratings.csv")
    _require(movies, ("movieId", "title", "genres"), str(src / "movies.csv"))
    _require(ratings, ("userId", "movieId", "timestamp"), str(src / "ratings.csv"))
    items = movies.select(
        pl.col("movieId").cast(pl.Int64).alias("item_id"),
        pl.col("title").cast(pl.Utf8),
        pl.col("genres").cast(pl.Utf8).str.replace_all(r"\|", ", ").alias("genres"),
    )
    interactions = ratings.select(
        pl.col("userId").alias("user_id"), pl.col("movieId").cast(pl.Int64).alias("item_id"),
        pl.col("timestamp"), pl.col("rating"),
    )
    known = interactions["item_id"].is_in(items["item_id"].implode())
    if (~known).any():
        logger.info("dropping %d ratings of movies missing from movies.csv", int((~known).sum()))
        interactions = interactions.filter(known)
    return write_catalog(out, items, interactions,
                         meta={"source": str(src), "dataset": "movielens-latest-small", "tie_break": "item_id"})


def item_text(items: pl.DataFrame, max_chars: int) -> list[str]:
    """Text fed to the item text encoder: title, genres and (truncated) description."""
    rows = items.select(
        "title",
        pl.col("genres") if "genres" in items.columns else pl.lit(None, dtype=pl.Utf8).alias("genres"),
        "text",
    ).iter_rows()
    out = []
    for title, genres, text in rows:
        parts = [title or ""]
        if genres:
            parts.append(f"Genres: {genres}.")
        if text and max_chars > 0:
            parts.append(text[:max_chars])
        out.append(" ".join(parts).strip())
    return out
