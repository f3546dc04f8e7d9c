"""Importers: source tables in some known format -> a canonical catalog folder (see :mod:`data.catalog`).

Every format is registered once in :data:`IMPORTERS` with the options it takes, so the CLI and Python callers
share one entry point, :func:`prepare`, and a new format is one decorated function here.

Importers drop source rows only when told to (generic: ``--drop-unknown-items``) or when the dataset's protocol
says so (movielens-latest: ratings of movies missing from ``movies.csv``; movielens-100k: repeated rows of the
TMDB side table). Every drop is logged at WARNING level with its count and reason, so it shows without ``-v``.
Everything else, media included, is validated by :func:`data.catalog.write_catalog`.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import polars as pl

from data.catalog import (
    INTERACTION_COLUMNS,
    ITEM_COLUMNS,
    MEDIA_DIR,
    Catalog,
    check_catalog_out,
    not_a_file,
    read_table,
    validate_items,
    write_catalog,
)
from data.columns import COLUMN_KINDS, check_column_types, require_columns
from data.formats import FORMATS
from data.ids import as_item_ids
from data.tombstones import Tombstones
from errors import CatalogError

logger = logging.getLogger(__name__)

# Options an importer may take; the CLI flag of each is ``--`` + the name with dashes.
OPTIONS = ("src", "items", "interactions", "mapping", "media_root", "drop_unknown_items")
_FLAGS = {"mapping": "--map"}


def flag(option: str) -> str:
    """The CLI flag that sets an importer option (used in error messages)."""
    return _FLAGS.get(option, "--" + option.replace("_", "-"))


@dataclass(frozen=True)
class Importer:
    """One registered source format."""

    name: str
    description: str
    run: Callable[..., Catalog]  # run(out, **options) -> Catalog
    required: tuple[str, ...]
    optional: tuple[str, ...] = ()
    defaults: dict | None = None  # option -> zero-argument callable giving its default


IMPORTERS: dict[str, Importer] = {}


def register(name: str, required: tuple[str, ...] = (), optional: tuple[str, ...] = (),
             defaults: dict | None = None):
    """Decorator that registers an importer ``fn(out, **options) -> Catalog`` under ``name``, a format of
    :data:`data.formats.FORMATS` (which describes it)."""
    def wrap(fn):
        assert not (set(required) | set(optional)) - set(OPTIONS), (required, optional)
        IMPORTERS[name] = Importer(name, FORMATS[name], fn, tuple(required), tuple(optional), defaults)
        return fn
    return wrap


def prepare(format: str, out: str | Path, overwrite: bool = False, tombstones: Tombstones | None = None,
            **options) -> Catalog:
    """Build a catalog at ``out`` from source data in ``format`` (one of :data:`IMPORTERS`).

    ``options`` are the importer's own (``src``, ``items``, ``interactions``, ``mapping``, ``media_root``,
    ``drop_unknown_items``); ``None`` means "not given". A required option that is missing, or an option the
    format does not use, is a :class:`CatalogError` naming the CLI flag.

    ``out`` must be a new path or an empty folder; an earlier catalog there is replaced only with ``overwrite``
    (``--overwrite``), once the new one is complete. A file, a folder with other files, and a path that is or
    holds one of the inputs are refused, before anything is read (see :func:`data.catalog.check_catalog_out`).
    Erased users (``tombstones``, and the list of the catalog being replaced) are left out and stay listed.
    """
    importer = IMPORTERS.get(format)
    if importer is None:
        raise CatalogError(f"unknown format {format!r}; choose one of {sorted(IMPORTERS)}")
    given = {k: v for k, v in options.items() if v is not None and v is not False and v != {} and v != []}
    unknown = sorted(set(given) - set(OPTIONS))
    if unknown:
        raise CatalogError(f"unknown importer option(s) {unknown}; known: {list(OPTIONS)}")
    unused = sorted(set(given) - set(importer.required) - set(importer.optional))
    if unused:
        raise CatalogError(f"--format {format} does not use {', '.join(flag(o) for o in unused)}")
    for option, default in (importer.defaults or {}).items():
        if option not in given:
            value = default()
            if value is not None:
                given[option] = value
    missing = [o for o in importer.required if o not in given]
    if missing:
        raise CatalogError(f"--format {format} needs {', '.join(flag(o) for o in missing)}")
    check_catalog_out(out, overwrite, _inputs(given))  # before a long import, not only when it is written
    return importer.run(out, overwrite=overwrite, tombstones=tombstones, **given)


def _inputs(options: dict) -> list[tuple[str, Path]]:
    """The paths an importer reads, as ``(flag, path)``: a catalog written over one of them would delete it."""
    return [(flag(o), Path(options[o])) for o in ("src", "items", "interactions", "media_root") if o in options]


def _ml100k_default_src() -> Path | None:
    """``$TOWERREC_ML100K``, else the project's ``../shared/datasets`` copy where it exists."""
    env = os.environ.get("TOWERREC_ML100K")
    if env:
        return Path(env)
    guess = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "movielens-100k-mm"
    return guess if guess.is_dir() else None


@register("generic", required=("items", "interactions"), optional=("mapping", "media_root", "drop_unknown_items"))
def _generic(out, items, interactions, mapping=None, media_root=None, drop_unknown_items=False,
             overwrite=False, tombstones=None) -> Catalog:
    return prepare_generic(items, interactions, out, mapping, media_root, drop_unknown_items, overwrite=overwrite,
                           tombstones=tombstones)


def _apply_mapping(mapping: dict[str, str], tables: list[tuple[pl.DataFrame, Path]]) -> list[pl.DataFrame]:
    """Rename columns of each ``(table, path)`` by ``mapping`` (source -> canonical), refusing ambiguity.

    Each of these is a :class:`CatalogError` naming the files and columns: a source column in neither table, a
    rename onto a column the table already has (unless that one is renamed away in the same mapping, as in a
    swap), and two columns renamed onto one. Polars would otherwise fail with a traceback, or the mapping would
    silently do nothing.
    """
    for src, dst in mapping.items():
        if not any(src in df.columns for df, _ in tables):
            where = "; ".join(f"{path} has {df.columns}" for df, path in tables)
            raise CatalogError(f"--map {src}={dst}: column {src!r} is in neither table ({where})")
    renamed = []
    for df, path in tables:
        rename = {src: dst for src, dst in mapping.items() if src in df.columns and src != dst}
        targets: dict[str, str] = {}
        for src, dst in rename.items():
            if dst in targets:
                raise CatalogError(f"{path}: --map {targets[dst]}={dst} and --map {src}={dst} both rename onto "
                                   f"column {dst!r}")
            targets[dst] = src
            if dst in df.columns and dst not in rename:
                raise CatalogError(f"{path}: --map {src}={dst} renames column {src!r} onto column {dst!r}, "
                                   f"which the file already has (drop one of them, or map {dst!r} elsewhere too)")
        renamed.append(df.rename(rename))
    return renamed


def prepare_generic(
    items_path: str | Path,
    interactions_path: str | Path,
    out: str | Path,
    mapping: dict[str, str] | None = None,
    media_root: str | Path | None = None,
    drop_unknown_items: bool = False,
    *,
    overwrite: bool = False,
    tombstones: Tombstones | None = None,
) -> Catalog:
    """Build a catalog from any CSV/Parquet pair.

    ``mapping`` renames source columns to canonical ones, e.g. ``{"movieId": "item_id"}``; each source column
    must exist in at least one of the two files, and must not be renamed onto a column the file already has.
    Media paths in the items table are relative to ``media_root`` (default: the items file's folder) and are
    copied into the catalog under ``media/`` (once: see :func:`catalog_media_path`); a path that escapes
    ``media_root``, names a folder or is missing is an error, and so is a file that does not decode completely.
    An interaction with an item missing from the items table is an error, unless ``drop_unknown_items``: then
    such rows are dropped, with a WARNING giving their number. ``out`` is checked as in :func:`prepare`
    (``overwrite`` replaces an earlier catalog).
    """
    items_path, interactions_path = Path(items_path), Path(interactions_path)
    items = read_table(items_path)
    interactions = read_table(interactions_path)
    items, interactions = _apply_mapping(mapping or {}, [(items, items_path), (interactions, interactions_path)])
    require_columns(items, ITEM_COLUMNS, str(items_path))
    require_columns(interactions, INTERACTION_COLUMNS, str(interactions_path))
    check_column_types(items, COLUMN_KINDS, str(items_path))
    check_column_types(interactions, COLUMN_KINDS, str(interactions_path))
    src_root = Path(media_root) if media_root else items_path.parent
    media: dict[str, Path] = {}
    first_use: dict[str, tuple[int, str, str]] = {}  # catalog path -> (row, column, source path) first naming it
    for column in ("image_path", "audio_path"):
        if column not in items.columns:
            continue
        new = []
        for row, rel in enumerate(items[column].cast(pl.Utf8).to_list(), start=1):
            if rel is None or rel.strip() == "":
                new.append(None)
                continue
            where = f"{items_path} row {row}: {column} {rel!r}"
            if "\0" in rel:
                raise CatalogError(f"{where} holds a NUL character, which no file name can")
            try:
                full = (src_root / rel).resolve()
                if Path(rel).is_absolute() or not full.is_relative_to(src_root.resolve()):
                    raise CatalogError(f"{where} is outside the media folder {src_root}")
                if not full.is_file():
                    raise CatalogError(f"{where} {not_a_file(full, src_root)}")
            except OSError as err:  # a name too long for the file system, a permission denied on a folder
                raise CatalogError(f"{where} cannot be looked up under {src_root} ({err.strerror})") from None
            target = catalog_media_path(src_root, rel)
            if target in media and media[target] != full:
                row0, column0, rel0 = first_use[target]
                raise CatalogError(f"{where} and row {row0}: {column0} {rel0!r} are different files that would both "
                                   f"be stored as {target!r} in the catalog; move one of them")
            media[target] = full
            first_use.setdefault(target, (row, column, rel))
            new.append(target)
        items = items.with_columns(pl.Series(column, new, dtype=pl.Utf8))
    items = validate_items(items, str(items_path))
    if drop_unknown_items and interactions.height:
        keep = as_item_ids(interactions["item_id"], items["item_id"].dtype).is_in(items["item_id"].implode())
        dropped = int((~keep).sum())
        if dropped == interactions.height:
            raise CatalogError(f"{interactions_path}: none of its {dropped} interactions has an item_id in "
                               f"{items_path} (wrong --map, or ids of another type?)")
        if dropped:
            logger.warning("%s: dropping %d of %d interactions whose item_id is not in %s (--drop-unknown-items)",
                           interactions_path, dropped, interactions.height, items_path)
        interactions = interactions.filter(keep)
    inputs = [("--items", items_path), ("--interactions", interactions_path), ("--media-root", src_root)]
    return write_catalog(out, items, interactions, media, meta={"source": str(items_path)},
                         items_source=str(items_path), interactions_source=str(interactions_path),
                         overwrite=overwrite, tombstones=tombstones, inputs=inputs)


def catalog_media_path(media_root: Path, rel: str) -> str:
    """Where a media file named ``rel`` (relative to ``media_root``) is stored in a catalog: ``media/<rel>``.

    ``rel`` is normalised first (``./``, ``a/../``). A path that already starts with ``media/`` (the usual
    layout when the media root is the items file's folder and the files sit in its ``media/`` folder) is kept as
    it is rather than nested as ``media/media/...``, so the catalog mirrors the source layout.
    """
    root = os.path.normpath(media_root.absolute())
    normal = Path(os.path.relpath(os.path.normpath(os.path.join(root, rel)), root)).as_posix()
    return normal if normal.split("/")[0] == MEDIA_DIR else f"{MEDIA_DIR}/{normal}"


def _genres_from_flags(df: pl.DataFrame, names: list[str]) -> pl.Series:
    flags = df.select(names).to_numpy()
    return pl.Series("genres", [", ".join(n for n, f in zip(names, row) if f) for row in flags], dtype=pl.Utf8)


@register("movielens-100k", required=("src",), defaults={"src": _ml100k_default_src})
def _ml100k(out, src, overwrite=False, tombstones=None) -> Catalog:
    return prepare_movielens_100k(src, out, overwrite=overwrite, tombstones=tombstones)


def prepare_movielens_100k(src: str | Path, out: str | Path, *, overwrite: bool = False,
                           tombstones: Tombstones | None = None) -> Catalog:
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
        tmdb = read_table(tmdb_path)
        repeated = tmdb.height - tmdb["movie_id"].n_unique()  # rows that unique(keep="first") drops below
        if repeated:
            exact = tmdb.height - tmdb.unique().height == repeated
            logger.warning("%s: dropping %d rows that repeat a movie_id (%s; the first row of each is kept)",
                           tmdb_path, repeated, "exact duplicates" if exact else "with differing values")
        tmdb = tmdb.select(
            pl.col("movie_id").cast(pl.Int64).alias("item_id"),
            pl.col("overview").cast(pl.Utf8).alias("text"),
            pl.col("year").cast(pl.Float64, strict=False).fill_nan(None).cast(pl.Int64).alias("year"),
        ).unique("item_id", keep="first", maintain_order=True)
        items = items.join(tmdb, on="item_id", how="left", maintain_order="left")
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
                         meta={"source": str(src), "dataset": "movielens-100k", "tie_break": "input_order"},
                         items_source=str(src / "u.item"), interactions_source=str(src / "u.data"),
                         overwrite=overwrite, tombstones=tombstones, inputs=[("--src", src)])


@register("movielens-latest", required=("src",))
def _ml_latest(out, src, overwrite=False, tombstones=None) -> Catalog:
    return prepare_movielens_latest(src, out, overwrite=overwrite, tombstones=tombstones)


def prepare_movielens_latest(src: str | Path, out: str | Path, *, overwrite: bool = False,
                             tombstones: Tombstones | None = None) -> Catalog:
    """Import MovieLens latest-small (``ratings.csv`` + ``movies.csv``), text only.

    As in LlamaRec's protocol, ratings of movies missing from ``movies.csv`` are dropped.
    """
    src = Path(src)
    movies = read_table(src / "movies.csv")
    ratings = read_table(src / "ratings.csv")
    require_columns(movies, ("movieId", "title", "genres"), str(src / "movies.csv"))
    require_columns(ratings, ("userId", "movieId", "timestamp"), str(src / "ratings.csv"))
    items = movies.select(
        pl.col("movieId").cast(pl.Int64).alias("item_id"),
        pl.col("title").cast(pl.Utf8),
        pl.col("genres").cast(pl.Utf8).str.replace_all(r"\|", ", ").alias("genres"),
    )
    interactions = ratings.select(
        pl.col("userId").alias("user_id"), pl.col("movieId").cast(pl.Int64).alias("item_id"),
        pl.col("timestamp"), pl.col("rating"),
    )
    # By protocol (LlamaRec), not by option: ratings of movies missing from movies.csv are dropped.
    known = interactions["item_id"].is_in(items["item_id"].implode())
    if (~known).any():
        logger.warning("%s: dropping %d of %d ratings of movies missing from %s (the LlamaRec protocol)",
                       src / "ratings.csv", int((~known).sum()), interactions.height, src / "movies.csv")
        interactions = interactions.filter(known)
    return write_catalog(out, items, interactions,
                         meta={"source": str(src), "dataset": "movielens-latest-small", "tie_break": "item_id"},
                         items_source=str(src / "movies.csv"), interactions_source=str(src / "ratings.csv"),
                         overwrite=overwrite, tombstones=tombstones, inputs=[("--src", src)])


@register("sequences", required=("src",))
def _sequences(out, src, overwrite=False, tombstones=None) -> Catalog:
    return prepare_sequences(src, out, overwrite=overwrite, tombstones=tombstones)


def prepare_sequences(src: str | Path, out: str | Path, *, overwrite: bool = False,
                      tombstones: Tombstones | None = None) -> Catalog:
    """Import whitespace-separated sequences (``src`` is the file, or a folder holding ``user_sequence.txt``).

    There are no timestamps: an interaction's position in its line is its timestamp, so the chronological
    split follows the file's order. Items have no text: their title is their id, and only an id vector (or
    whatever the config adds) can describe them.
    """
    path = Path(src)
    if path.is_dir():
        path = path / "user_sequence.txt"
    if not path.is_file():
        raise CatalogError(f"{path}: file not found (expected one line per user: user_id item_id item_id ...)")
    users, items, stamps = [], [], []
    seen_users: dict[str, int] = {}  # user id -> the row it was first on
    with path.open(encoding="utf-8") as f:
        for row, line in enumerate(f, start=1):
            parts = line.split()
            if not parts:
                continue
            if len(parts) < 2:
                raise CatalogError(f"{path} row {row}: user {parts[0]!r} has no items")
            if parts[0] in seen_users:
                raise CatalogError(f"{path} row {row}: user {parts[0]!r} appears twice: row {row} repeats row "
                                   f"{seen_users[parts[0]]}")
            seen_users[parts[0]] = row
            for t, item in enumerate(parts[1:]):
                users.append(parts[0])
                items.append(item)
                stamps.append(t)
    if not users:
        raise CatalogError(f"{path}: no sequences")
    interactions = pl.DataFrame({"user_id": users, "item_id": items, "timestamp": stamps})
    ids = interactions["item_id"].unique(maintain_order=True)
    catalog_items = pl.DataFrame({"item_id": ids, "title": ids})
    return write_catalog(out, catalog_items, interactions,
                         meta={"source": str(path), "dataset": path.parent.name, "tie_break": "input_order"},
                         items_source=str(path), interactions_source=str(path),
                         overwrite=overwrite, tombstones=tombstones, inputs=[("--src", src)])
