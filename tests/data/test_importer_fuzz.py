"""Fuzzing the generic importer with hypothesis: whatever the source files hold, `prepare` either writes a catalog
that `load_catalog` reads back unchanged, or raises one :class:`errors.TowerrecError` (never a raw polars, numpy or
OS error, which the CLI would print as a traceback).

The inputs are CSV text (random cells: numbers, dates, quotes, separators, newlines, NUL bytes, long fields),
written in several encodings and with several delimiters, ragged or not; raw random bytes; and Parquet tables
with random column dtypes. Every test is derandomized (the same examples on every run) and small enough to keep
the file well under 30 s.
"""

from __future__ import annotations

import collections
import datetime as dt
import shutil
from pathlib import Path

import polars as pl
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from data.catalog import load_catalog
from data.importers import prepare
from errors import TowerrecError


def fuzz(examples: int) -> settings:
    """Reproducible (derandomized) settings; ``tmp_path`` is shared by a test's examples, which clear ``out``."""
    return settings(max_examples=examples, deadline=None, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


# Cells for each kind of column: mostly valid values, with the awkward ones mixed in (quotes, separators,
# newlines, NUL bytes, non-ASCII, long fields, pre-1970 dates, numbers out of range).
ODD = st.sampled_from(["", " ", '"', 'say "hi"', "a,b", "a;b", "a\tb", "a|b", "line\nbreak", "\x00", "é", "媒体",
                       "\ufeff", "x" * 3000, "nan", "-1", "99999999999999999999999"])

# Each kind of column: (valid cells, awkward or invalid cells).
CELLS = {
    "id": (st.one_of(st.integers(min_value=0, max_value=9).map(str), st.sampled_from(["007", "a", "b", "é"])),
           st.one_of(ODD, st.sampled_from(["1.0", "-0", "2e3"]))),
    "text": (st.text(min_size=1, max_size=15).filter(str.strip), st.one_of(ODD, st.text(max_size=3))),
    "rating": (st.integers(min_value=1, max_value=5).map(str), st.one_of(st.floats().map(repr), ODD)),
    "media": (st.sampled_from(["", "ok.png", "./sub/../ok.png"]),
              st.sampled_from(["media/ok.png", "bad.png", "missing.png", "sub", "../outside.png", "/etc/passwd",
                               "a\x00b.png", "n" * 300 + ".png"])),
}
TIMES = {
    "unix": st.integers(min_value=0, max_value=2_000_000_000).map(str),
    "milliseconds": st.integers(min_value=10**12, max_value=2 * 10**12).map(str),
    "iso": st.sampled_from(["2020-01-01", "2020-01-02T10:00:00", "2021-06-01 08:30:00", "2022-03-04T05:06:07Z",
                            "2023-01-01T00:00:00+02:00"]),
}
ODD_TIMES = st.one_of(ODD, st.sampled_from(["1969-12-31", "2020-13-45", "1.5e9", "inf", "1e400", "-5", "0001-01-01",
                                            "9999-12-31T23:59:59"]), st.floats().map(repr), st.integers().map(str))


@st.composite
def source_tables(draw) -> tuple[list[list[str]], list[list[str]]]:
    """An items table and an interactions table (header first). Half of the pairs use valid cells only (so the
    fuzz reaches the checks behind the first bad cell, and writes catalogs); the others mix awkward cells in."""
    clean = draw(st.booleans())

    def cell(kind: str) -> str:
        good, bad = CELLS[kind]
        return draw(good if clean or draw(st.integers(0, 3)) else bad)

    def time(style: str) -> str:
        return draw(TIMES[style] if clean or draw(st.integers(0, 3)) else ODD_TIMES)

    ids = list(dict.fromkeys(cell("id") for _ in range(draw(st.integers(min_value=0, max_value=5)))))
    if not clean and ids and draw(st.booleans()):
        ids.append(ids[0])  # a duplicate item id
    extra = draw(st.lists(st.sampled_from(["text", "image_path", "year"]), unique=True, max_size=3))
    kinds = {"text": "text", "image_path": "media", "year": "id"}
    items = [["item_id", "title", *extra]] + [[i, cell("text"), *(cell(kinds[c]) for c in extra)] for i in ids]
    rated, style = draw(st.booleans()), draw(st.sampled_from(sorted(TIMES)))
    interactions = [["user_id", "item_id", "timestamp", *(["rating"] if rated else [])]]
    for _ in range(draw(st.integers(min_value=0, max_value=8))):
        item = draw(st.sampled_from(ids)) if ids and (clean or draw(st.integers(0, 9))) else cell("id")
        interactions.append([cell("id"), item, time(style), *([cell("rating")] if rated else [])])
    for table in (items, interactions):  # now and then a row made ragged
        if not clean and len(table) > 1 and not draw(st.integers(0, 7)):
            row = draw(st.integers(0, len(table) - 1))
            table[row] = table[row][:-1] if draw(st.booleans()) else [*table[row], "extra"]
    return items, interactions


def _csv(rows: list[list[str]], delimiter: str) -> str:
    """CSV text with cells quoted the way a spreadsheet would (so delimiters and newlines stay in their cell)."""
    def cell(value: str) -> str:
        return '"' + value.replace('"', '""') + '"' if any(c in value for c in f'"\n\r{delimiter}') else value
    return "".join(delimiter.join(cell(v) for v in row) + "\n" for row in rows)


def _media_folder(src: Path) -> None:
    """The files MEDIA_CELLS name: a valid PNG (twice), a corrupt one, a folder and a file outside ``src``."""
    from PIL import Image

    (src / "media").mkdir(parents=True, exist_ok=True)
    (src / "sub").mkdir(exist_ok=True)
    Image.new("RGB", (4, 3), (200, 10, 10)).save(src / "ok.png")
    shutil.copyfile(src / "ok.png", src / "media" / "ok.png")
    (src / "bad.png").write_bytes((src / "ok.png").read_bytes()[:30])
    shutil.copyfile(src / "ok.png", src.parent / "outside.png")


def _check_prepare(tmp_path: Path, items: Path, interactions: Path, **options) -> str:
    """`prepare` succeeds with a catalog that reads back the same, or raises a TowerrecError; nothing else.

    Returns "ok" or the error's class name (the tests count them, to show the fuzz reaches both outcomes).
    """
    out = tmp_path / "catalog"
    shutil.rmtree(out, ignore_errors=True)
    try:
        catalog = prepare("generic", out, items=str(items), interactions=str(interactions), **options)
    except TowerrecError as err:
        assert str(err).strip() and "\n" not in str(err).strip(), f"one line, please: {err!r}"
        assert not out.exists(), "a refused prepare leaves nothing at --out"
        return type(err).__name__
    reloaded = load_catalog(out)
    assert reloaded.items.equals(catalog.items)
    assert reloaded.interactions.equals(catalog.interactions)
    return "ok"


@pytest.fixture(scope="module")
def outcomes():
    """How many fuzzed inputs each test saw accepted and refused: both must occur, or the fuzz tests nothing."""
    seen: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    yield seen
    for name, counts in seen.items():
        assert counts["ok"] > 0 and sum(counts.values()) > counts["ok"], (name, counts)


@fuzz(200)
@given(tables=source_tables(), delimiter=st.sampled_from([",", ";", "\t", "|"]),
       encoding=st.sampled_from(["utf-8", "utf-8-sig", "utf-16", "utf-32", "latin-1"]))
def test_fuzz_csv_tables(tmp_path: Path, outcomes, tables, delimiter: str, encoding: str) -> None:
    src = tmp_path / "src"
    if not src.exists():
        _media_folder(src)
    paths = []
    for name, rows in zip(("items.csv", "interactions.csv"), tables):
        path = src / name
        path.write_bytes(_csv(rows, delimiter).encode(encoding, errors="replace"))
        paths.append(path)
    outcomes["csv"][_check_prepare(tmp_path, *paths)] += 1


@fuzz(100)
@given(items=st.binary(max_size=300), interactions=st.binary(max_size=300),
       prefix=st.sampled_from([b"", b"item_id,title\n", b"user_id,item_id,timestamp\n"]))
def test_fuzz_raw_bytes(tmp_path: Path, items: bytes, interactions: bytes, prefix: bytes) -> None:
    src = tmp_path / "src"
    src.mkdir(exist_ok=True)
    (src / "items.csv").write_bytes(b"item_id,title\n" + items if prefix else items)
    (src / "interactions.csv").write_bytes(prefix + interactions)
    _check_prepare(tmp_path, src / "items.csv", src / "interactions.csv")


# Parquet columns of assorted dtypes, each with a few values that matter for that dtype.
_T0 = 1_700_000_000
PARQUET_COLUMNS = {
    "int64": pl.Series([1, 2, 3, -1, 0, 2**62], dtype=pl.Int64),
    "int8": pl.Series([1, 2, 3, -1, 0, 127], dtype=pl.Int8),
    "uint64": pl.Series([1, 2, 3, 2**64 - 1, 0, 7], dtype=pl.UInt64),
    "float": pl.Series([1.0, 2.5, float("nan"), float("inf"), -0.0, 1e300]),
    "str": pl.Series(["1", "2", "007", "", None, "x" * 300]),
    "bool": pl.Series([True, False, None, True, False, True]),
    "date": pl.Series([dt.date(2020, 1, 1), dt.date(1960, 5, 1), None, dt.date(2021, 2, 3), dt.date(1, 1, 1),
                       dt.date(9999, 12, 31)]),
    "datetime": pl.Series([dt.datetime(2020, 1, 1, 10), None, dt.datetime(1969, 12, 31, 23, 59),
                           dt.datetime(2024, 5, 6), dt.datetime(2024, 5, 7), dt.datetime(2024, 5, 8)]),
    "duration": pl.Series([dt.timedelta(seconds=5)] * 6),
    "unix": pl.Series([_T0, _T0 + 1, _T0 * 1000, _T0 + 2, _T0 + 3, _T0 + 4]),
    "list": pl.Series([[1], [2], [], None, [3, 4], [5]]),
    "struct": pl.Series([{"a": 1}, {"a": 2}, {"a": None}, None, {"a": 3}, {"a": 4}]),
    "null": pl.Series([None] * 6, dtype=pl.Null),
    "binary": pl.Series([b"1", b"2", b"\x00", b"", None, b"\xff"]),
    "categorical": pl.Series(["a", "b", "a", "c", None, "b"], dtype=pl.Categorical),
    "decimal": pl.Series(["1.5", "2.0", "3.25", None, "0", "-1"]).cast(pl.Decimal(10, 2)),
}
DTYPES = st.sampled_from(sorted(PARQUET_COLUMNS))


CASTS = {"text": lambda c: c.cast(pl.Utf8), "float": lambda c: c.cast(pl.Float64, strict=False),
         "categorical": lambda c: c.cast(pl.Utf8).cast(pl.Categorical), "int8": lambda c: c.cast(pl.Int8, strict=False)}


@st.composite
def parquet_tables(draw) -> tuple[pl.DataFrame, pl.DataFrame]:
    """A valid pair of tables in which some columns are cast to another dtype, replaced by one, or dropped."""
    n_items, n_events = draw(st.integers(min_value=1, max_value=4)), draw(st.integers(min_value=0, max_value=6))
    items = {"item_id": pl.Series(range(1, n_items + 1)), "title": pl.Series([f"t{i}" for i in range(n_items)]),
             "text": pl.Series(["x"] * n_items)}
    events = {"user_id": pl.Series([i % 2 for i in range(n_events)]),
              "item_id": pl.Series([1 + i % n_items for i in range(n_events)], dtype=pl.Int64),
              "timestamp": pl.Series([_T0 + i for i in range(n_events)]), "rating": pl.Series([4.0] * n_events)}
    for table in (items, events):
        for column in list(table):
            change = draw(st.sampled_from(["keep", "keep", "cast", "replace", "drop"]))
            if change == "cast":
                table[column] = CASTS[draw(st.sampled_from(sorted(CASTS)))](table[column])
            elif change == "replace":
                pool = PARQUET_COLUMNS[draw(DTYPES)]
                table[column] = pool.gather([i % len(pool) for i in range(len(table[column]))])
            elif change == "drop":
                del table[column]
    return pl.DataFrame(items), pl.DataFrame(events, schema={c: s.dtype for c, s in events.items()})


@fuzz(150)
@given(tables=parquet_tables())
def test_fuzz_parquet_dtypes(tmp_path: Path, outcomes, tables: tuple[pl.DataFrame, pl.DataFrame]) -> None:
    src = tmp_path / "src"
    src.mkdir(exist_ok=True)
    tables[0].write_parquet(src / "items.parquet")
    tables[1].write_parquet(src / "interactions.parquet")
    outcomes["parquet"][_check_prepare(tmp_path, src / "items.parquet", src / "interactions.parquet")] += 1

