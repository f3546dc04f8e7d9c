"""Reading the canonical columns of a source table: which dtypes each may hold, and how timestamps and ratings
are parsed. Every problem is a :class:`CatalogError` naming the table, the row (1-based, header excluded) and the
field.

Timestamps are read from:

- integer or float unix time in seconds, milliseconds, microseconds or nanoseconds. The scale is detected
  from each value's magnitude: up to 1e11 is seconds (1e11 s is the year 5138), up to 1e14 milliseconds,
  up to 1e17 microseconds, above that nanoseconds. Anything but seconds is converted to seconds (floored)
  with a WARNING naming the scale and the row count. A column whose values fall in different scales is
  refused, naming the first row whose scale differs from the first numeric row's;
- ISO-8601 dates and datetimes (``2026-03-12``, ``2026-03-12 08:37:00``, ``2026-03-12T08:37:00.5Z``,
  ``...+02:00``), read as UTC unless they carry an offset;
- Parquet ``Date``/``Datetime`` columns.

A text column may mix unix numbers and ISO-8601 strings; the scale check applies to the numbers. A column of
dates (a ``Date``/``Datetime`` column, or a text column with at least one ISO-8601 value) may not hold a time
before 1970-01-01, whether written as a date or as a (negative) number: the row is named. A purely numeric
column is taken as it is.

A ``rating`` cell that is empty, not a number, NaN or infinite is refused: a catalog either rates every
interaction or has no ``rating`` column.
"""

from __future__ import annotations

import logging

import polars as pl

from errors import CatalogError

logger = logging.getLogger("data.catalog")


def require_columns(df: pl.DataFrame, columns, source: str) -> None:
    missing = [c for c in columns if c not in df.columns]
    if missing:
        raise CatalogError(f"{source}: missing column {missing[0]!r} (columns present: {df.columns})")


# What each canonical column may hold, checked before any cast (a Parquet file can carry any dtype; polars
# cannot read lists, structs, binary or durations as text or numbers, and would fail with its own error).
_ID_COLUMN = ("integers or text", lambda d: d.is_integer() or d.is_float() or d in (pl.Utf8, pl.Categorical, pl.Null)
              or isinstance(d, pl.Enum))
_TEXT_COLUMN = ("text", lambda d: d.is_numeric() or (d.is_temporal() and d != pl.Duration)
                or d in (pl.Utf8, pl.Categorical, pl.Boolean, pl.Null) or isinstance(d, pl.Enum))
_TIME_COLUMN = ("unix times, dates or ISO-8601 text", lambda d: d.is_integer() or d.is_float()
                or d in (pl.Date, pl.Datetime, pl.Utf8, pl.Categorical, pl.Null) or isinstance(d, pl.Enum))
_NUMBER_COLUMN = ("numbers", lambda d: d.is_numeric() or d in (pl.Utf8, pl.Categorical, pl.Boolean, pl.Null)
                  or isinstance(d, pl.Enum))
COLUMN_KINDS = {"item_id": _ID_COLUMN, "user_id": _ID_COLUMN, "title": _TEXT_COLUMN, "text": _TEXT_COLUMN,
                "image_path": _TEXT_COLUMN, "audio_path": _TEXT_COLUMN, "timestamp": _TIME_COLUMN,
                "rating": _NUMBER_COLUMN}


def check_column_types(df: pl.DataFrame, columns, source: str) -> None:
    """Refuse a canonical column whose dtype cannot hold what it should (see :data:`COLUMN_KINDS`), naming it."""
    for column in columns:
        if column not in df.columns:
            continue
        expected, fits = COLUMN_KINDS[column]
        dtype = df.schema[column]
        if not fits(dtype):
            raise CatalogError(f"{source}: field {column!r} holds values of type {dtype}; expected {expected}")


def first_bad_row(mask: pl.Series) -> int:
    """1-based row number of the first True in a boolean mask."""
    return int(mask.arg_true()[0]) + 1


# (name, divisor to seconds, smallest magnitude in this scale). 1e11 s is the year 5138 and 1e11 ms is 1973, so
# any timestamp of real data lands in exactly one band; see the module docstring.
_TIME_SCALES = (("seconds", 1, 0.0), ("milliseconds", 10**3, 1e11), ("microseconds", 10**6, 1e14),
                ("nanoseconds", 10**9, 1e17))


def _unreadable_timestamp(col: pl.Series, bad: pl.Series, source: str) -> CatalogError:
    row = first_bad_row(bad)
    value = col[row - 1]
    if value is None or (isinstance(value, str) and not value.strip()):
        return CatalogError(f"{source} row {row}: empty field 'timestamp'")
    return CatalogError(f"{source} row {row}: unreadable timestamp {value!r} in field 'timestamp'")


def _to_seconds(ints: pl.Series, floats: pl.Series, col: pl.Series, source: str) -> tuple[pl.Series, pl.Series]:
    """Unix times in any one scale (see :data:`_TIME_SCALES`) -> seconds, for the integer and float values.

    ``ints`` and ``floats`` are aligned with ``col`` and null where that row is not a number of their kind.
    """
    magnitude = ints.cast(pl.Float64).fill_null(floats).abs()
    band_expr = pl.when(magnitude.is_null()).then(None)
    for i in range(len(_TIME_SCALES) - 1, 0, -1):
        band_expr = band_expr.when(magnitude >= _TIME_SCALES[i][2]).then(i)
    band = pl.select(band_expr.otherwise(0).cast(pl.Int8)).to_series()  # index into _TIME_SCALES, per row
    numeric = band.is_not_null()
    if not numeric.any():
        return ints, floats
    first = first_bad_row(numeric)
    first_band = int(band[first - 1])
    mixed = numeric & (band != first_band)
    if mixed.any():
        row = first_bad_row(mixed)
        raise CatalogError(
            f"{source} row {row}: timestamp {col[row - 1]!r} looks like unix {_TIME_SCALES[int(band[row - 1])][0]} "
            f"but row {first} ({col[first - 1]!r}) looks like unix {_TIME_SCALES[first_band][0]}; field 'timestamp' "
            "must use one scale")
    name, divisor, low = _TIME_SCALES[first_band]
    if divisor == 1:
        return ints, floats
    # The largest value as given (exact for integers: a float64 would round nanoseconds).
    largest = max(v for v in (ints.abs().max(), floats.abs().max()) if v is not None)
    logger.warning("%s: timestamps look like unix %s (largest %s, at least %.0e); converted %d rows to seconds",
                   source, name, largest, low, int(numeric.sum()))
    return ints // divisor, (floats / divisor).floor()


def parse_timestamps(col: pl.Series, source: str, stored: bool = False) -> pl.Series:
    """Any supported timestamp column (see the module docstring) -> int64 unix seconds.

    ``stored``: an integer column is unix seconds as it is (a written catalog's), with no scale detection.
    """
    if stored and col.dtype.is_integer():
        out = col.cast(pl.Int64, strict=False)  # null beyond int64 (a uint64 column)
        if out.is_null().any():
            raise _unreadable_timestamp(col, out.is_null(), source)
        return out.rename("timestamp")
    if col.dtype == pl.Datetime or col.dtype == pl.Date:
        out = col.cast(pl.Datetime("us")).dt.epoch("s")
        if out.is_null().any():
            raise _unreadable_timestamp(col, out.is_null(), source)
        return _refuse_before_1970(out, col, source).rename("timestamp")
    iso = pl.Series([None] * len(col), dtype=pl.Int64)
    if col.dtype.is_integer():
        # Beyond int64 (a uint64 column) is null, then reported as unreadable.
        ints, floats = col.cast(pl.Int64, strict=False), pl.Series([None] * len(col), dtype=pl.Float64)
    elif col.dtype.is_float():
        ints, floats = pl.Series([None] * len(col), dtype=pl.Int64), col.cast(pl.Float64)
    else:
        text = col.cast(pl.Utf8).str.strip_chars()
        ints = text.cast(pl.Int64, strict=False)  # exact, even for nanoseconds (beyond float64's 2**53)
        floats = text.cast(pl.Float64, strict=False).set(ints.is_not_null(), None)
        rest = ints.is_null() & floats.is_null() & text.is_not_null()
        if rest.any():
            try:  # ISO-8601 dates and datetimes; polars raises when no format fits at all
                iso = text.set(~rest, None).str.to_datetime(strict=False, time_zone="UTC").dt.epoch("s")
            except pl.exceptions.PolarsError:
                pass
    # NaN and infinity are not times: leave them null so they are reported as unreadable.
    floats = floats.set(~floats.is_finite().fill_null(True), None)
    ints, floats = _to_seconds(ints, floats, col, source)
    out = ints.fill_null(floats.cast(pl.Int64, strict=False)).fill_null(iso)
    if out.is_null().any():
        raise _unreadable_timestamp(col, out.is_null(), source)
    if iso.is_not_null().any():  # a column of dates: a number in it is a unix time too, and must not precede 1970
        out = _refuse_before_1970(out, col, source)
    return out.rename("timestamp")


def _refuse_before_1970(seconds: pl.Series, col: pl.Series, source: str) -> pl.Series:
    """``seconds`` unchanged, unless one is negative: a date column's value before 1970 is refused, naming its row.

    Interaction logs start after 1970; in a column of dates a pre-1970 value is a typo or a placeholder
    (``1900-01-01``), and its negative unix time would sort it before every real event.
    """
    negative = seconds < 0
    if negative.any():
        row = first_bad_row(negative)
        value = col[row - 1]
        shown = repr(value) if isinstance(value, str) else str(value)
        raise CatalogError(f"{source} row {row}: timestamp {shown} is before 1970-01-01 (a negative unix "
                           "time) in field 'timestamp', a column of dates")
    return seconds


def parse_ratings(col: pl.Series, source: str) -> pl.Series:
    """A rating column -> float64; an empty, non-numeric, NaN or infinite cell is refused (see the module docstring)."""
    if col.dtype.is_numeric() or col.dtype == pl.Boolean:
        out = col.cast(pl.Float64)
    else:
        out = col.cast(pl.Utf8).str.strip_chars().cast(pl.Float64, strict=False)
    empty = col.is_null() | (col.cast(pl.Utf8).str.strip_chars() == "").fill_null(True)
    if empty.any():
        row = first_bad_row(empty)
        raise CatalogError(f"{source} row {row}: empty field 'rating' (rate every interaction, or leave the "
                           "rating column out)")
    bad = out.is_null() | ~out.is_finite().fill_null(False)
    if bad.any():
        row = first_bad_row(bad)
        raise CatalogError(f"{source} row {row}: rating {col[row - 1]!r} is not a finite number (field 'rating')")
    return out.rename("rating")
