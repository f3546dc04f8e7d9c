"""Inputs `prepare` refuses (empty titles, pre-1970 dates, unreadable files and column types) and how its messages
name them (duplicate ids, media folders), plus where media land in the catalog (once under media/)."""

from __future__ import annotations

import datetime as dt
import shutil
from pathlib import Path

import polars as pl
import pytest
from PIL import Image

from data.catalog import load_catalog, validate_interactions, validate_items, write_catalog
from data.importers import prepare, prepare_generic
from errors import CatalogError

EVENTS = "user_id,item_id,timestamp\n10,1,100\n10,2,200\n"


def _write(folder: Path, items: str = "item_id,title\n1,Alpha\n2,Beta\n", events: str = EVENTS,
           suffix: str = ".csv") -> tuple[Path, Path]:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"items{suffix}").write_text(items)
    (folder / f"events{suffix}").write_text(events)
    return folder / f"items{suffix}", folder / f"events{suffix}"


def _refusal(tmp_path: Path, items: Path, events: Path, **options) -> str:
    with pytest.raises(CatalogError) as err:
        prepare_generic(items, events, tmp_path / "cat", **options)
    assert not (tmp_path / "cat").exists()
    return str(err.value)


ONE_ITEM = validate_items(pl.DataFrame({"item_id": [1], "title": ["a"]}), "items")


# --- titles and ids -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("cell", ["", "   ", '"  \t "'])
def test_empty_title_refused_with_file_row_and_field(tmp_path: Path, cell: str) -> None:
    items, events = _write(tmp_path / "src", items=f"item_id,title\n1,Alpha\n2,{cell}\n")
    assert _refusal(tmp_path, items, events) == f"{items} row 2: empty field 'title' (every item needs a title)"


def test_missing_title_refused_in_a_dataframe(tmp_path: Path) -> None:
    events = pl.DataFrame({"user_id": [1], "item_id": [1], "timestamp": [5]})
    with pytest.raises(CatalogError, match=r"^items row 2: empty field 'title'"):
        write_catalog(tmp_path / "cat", pl.DataFrame({"item_id": [1, 2], "title": ["a", None]}), events)


def test_blank_ids_are_empty_fields(tmp_path: Path) -> None:
    items, events = _write(tmp_path / "src", items="item_id,title\n1,Alpha\n  ,Beta\n")
    assert _refusal(tmp_path, items, events) == f"{items} row 2: empty field 'item_id'"
    items, events = _write(tmp_path / "src2", events="user_id,item_id,timestamp\n10,1,100\n ,2,200\n")
    assert _refusal(tmp_path, items, events) == f"{events} row 2: empty field 'user_id'"


def test_repeated_sequence_user_names_both_rows(tmp_path: Path) -> None:
    (tmp_path / "user_sequence.txt").write_text("u1 1 2\nu2 3 4\nu1 5 6\n")
    with pytest.raises(CatalogError, match=r"row 3: user 'u1' appears twice: row 3 repeats row 1$"):
        prepare("sequences", tmp_path / "cat", src=str(tmp_path))


# --- timestamps in a column of dates ----------------------------------------------------------------------------


def test_date_before_1970_refused(tmp_path: Path) -> None:
    items, events = _write(tmp_path / "src", events="user_id,item_id,timestamp\n10,1,2020-01-01\n10,2,1969-12-31\n")
    assert _refusal(tmp_path, items, events) == (
        f"{events} row 2: timestamp '1969-12-31' is before 1970-01-01 (a negative unix time) in field 'timestamp', "
        "a column of dates")


def test_negative_number_in_a_column_of_dates_refused() -> None:
    df = pl.DataFrame({"user_id": [1, 1], "item_id": [1, 1], "timestamp": ["2020-01-01T10:00:00Z", "-5"]})
    with pytest.raises(CatalogError, match=r"^inter row 2: timestamp '-5' is before 1970-01-01"):
        validate_interactions(df, ONE_ITEM, "inter")


def test_parquet_date_before_1970_refused() -> None:
    df = pl.DataFrame({"user_id": [1, 1], "item_id": [1, 1], "timestamp": [dt.date(2020, 1, 1), dt.date(1960, 5, 1)]})
    with pytest.raises(CatalogError, match=r"^inter row 2: timestamp 1960-05-01 is before 1970-01-01"):
        validate_interactions(df, ONE_ITEM, "inter")


def test_numeric_column_keeps_its_values() -> None:
    """Only a column of dates is held to 1970: plain numbers (positions, offsets) are taken as they are."""
    df = pl.DataFrame({"user_id": [1, 1], "item_id": [1, 1], "timestamp": ["-5", "3"]})
    assert validate_interactions(df, ONE_ITEM, "inter")["timestamp"].to_list() == [-5, 3]


def test_far_future_dates_reload_unchanged(tmp_path: Path) -> None:
    """A stored catalog's timestamps are seconds: a date after 5138 is not read back as milliseconds."""
    items, events = _write(tmp_path / "src", events="user_id,item_id,timestamp\n10,1,2020-01-01\n"
                                                    "10,2,9999-12-31T23:59:59\n")
    written = prepare_generic(items, events, tmp_path / "cat")
    assert written.interactions["timestamp"].to_list() == [1577836800, 253402300799]
    assert load_catalog(tmp_path / "cat").interactions.equals(written.interactions)


# --- media: folders, and where files land ----------------------------------------------------------------------


def _png(path: Path, color: tuple[int, int, int] = (200, 10, 10)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (4, 3), color).save(path)
    return path


def test_folder_as_media_path_is_named_a_folder(tmp_path: Path) -> None:
    src = tmp_path / "src"
    (src / "posters").mkdir(parents=True)
    items, events = _write(src, items="item_id,title,image_path\n1,Alpha,\n2,Beta,posters\n")
    assert _refusal(tmp_path, items, events) == (
        f"{items} row 2: image_path 'posters' is a folder under {src}, not a file")
    events_df = pl.DataFrame({"user_id": [1], "item_id": [1], "timestamp": [5]})
    items_df = pl.DataFrame({"item_id": [1], "title": ["a"], "image_path": ["media"]})
    with pytest.raises(CatalogError, match=r"^items row 1: image_path 'media' is a folder under .*, not a file$"):
        write_catalog(tmp_path / "cat", items_df, events_df, media={"media/x.png": _png(src / "x.png")})


@pytest.mark.parametrize("rel, reason", [("n" * 300 + ".png", "cannot be looked up under {root} (File name too long)"),
                                         ("a\x00b.png", "holds a NUL character, which no file name can")])
def test_unusable_media_names_are_one_error(tmp_path: Path, rel: str, reason: str) -> None:
    src = tmp_path / "src"
    items, events = _write(src, items=f"item_id,title,image_path\n1,Alpha,{rel}\n2,Beta,\n")
    assert _refusal(tmp_path, items, events) == f"{items} row 1: image_path {rel!r} " + reason.format(root=src)
    events_df = pl.DataFrame({"user_id": [1], "item_id": [1], "timestamp": [5]})
    with pytest.raises(CatalogError) as err:
        write_catalog(tmp_path / "cat", pl.DataFrame({"item_id": [1], "title": ["a"], "image_path": [rel]}), events_df)
    assert str(err.value) == f"items row 1: image_path {rel!r} " + reason.format(root=tmp_path / "cat")


def test_media_under_media_folder_land_once(tmp_path: Path) -> None:
    """The examples/ layout: paths like media/a.png beside the items file; the catalog has media/a.png, not
    media/media/a.png. Paths relative to --media-root go under media/, normalised."""
    src = tmp_path / "src"
    _png(src / "media" / "a.png")
    _png(src / "media" / "b" / "c.png", (0, 90, 0))
    items, events = _write(src, items="item_id,title,image_path\n1,Alpha,media/a.png\n2,Beta,./x/../media/b/c.png\n")
    catalog = prepare("generic", tmp_path / "cat", items=str(items), interactions=str(events))
    assert catalog.items["image_path"].to_list() == ["media/a.png", "media/b/c.png"]
    assert sorted(str(p.relative_to(tmp_path / "cat")) for p in (tmp_path / "cat").rglob("*.png")) == [
        "media/a.png", "media/b/c.png"]
    assert (tmp_path / "cat" / "media" / "a.png").read_bytes() == (src / "media" / "a.png").read_bytes()

    items, events = _write(src, items="item_id,title,image_path\n1,Alpha,a.png\n2,Beta,b/c.png\n")
    catalog = prepare("generic", tmp_path / "cat2", items=str(items), interactions=str(events),
                      media_root=str(src / "media"))
    assert catalog.items["image_path"].to_list() == ["media/a.png", "media/b/c.png"]
    assert not (tmp_path / "cat2" / "media" / "media").exists()


def test_two_files_that_would_share_a_catalog_path_are_refused(tmp_path: Path) -> None:
    src = tmp_path / "src"
    _png(src / "a.png")
    _png(src / "media" / "a.png", (0, 0, 255))
    items, events = _write(src, items="item_id,title,image_path\n1,Alpha,media/a.png\n2,Beta,a.png\n")
    assert _refusal(tmp_path, items, events) == (
        f"{items} row 2: image_path 'a.png' and row 1: image_path 'media/a.png' are different files that would both "
        "be stored as 'media/a.png' in the catalog; move one of them")


# --- reading source files -------------------------------------------------------------------------------------


@pytest.mark.parametrize("encoding", ["utf-8-sig", "utf-16", "utf-32"])
def test_unicode_encodings_with_a_byte_order_mark_are_read(tmp_path: Path, encoding: str) -> None:
    items, events = _write(tmp_path / "src")
    items.write_bytes("item_id,title\n1,Amélie\n2,東京物語\n".encode(encoding))
    catalog = prepare_generic(items, events, tmp_path / "cat")
    assert catalog.items.columns[:2] == ["item_id", "title"]
    assert catalog.items["title"].to_list() == ["Amélie", "東京物語"]


def test_non_utf8_file_named_with_line_and_byte(tmp_path: Path) -> None:
    items, events = _write(tmp_path / "src")
    items.write_bytes("item_id,title\n1,Alpha\n2,Amélie\n".encode("latin-1"))
    assert _refusal(tmp_path, items, events) == (
        f"{items}: line 3 is not UTF-8 text (byte 26: b'\\xe9'); save the file as UTF-8")


@pytest.mark.parametrize("separator, suffix", [(";", ".csv"), ("\t", ".csv"), ("|", ".csv"), ("\t", ".tsv")])
def test_other_separators_are_read(tmp_path: Path, separator: str, suffix: str) -> None:
    items_text = f'item_id{separator}title\n1{separator}"Alpha, the first"\n2{separator}Beta\n'
    items, events = _write(tmp_path / "src", items=items_text, events=EVENTS.replace(",", separator), suffix=suffix)
    catalog = prepare_generic(items, events, tmp_path / "cat")
    assert catalog.items.select("item_id", "title").rows() == [(1, "Alpha, the first"), (2, "Beta")]


@pytest.mark.parametrize("items_text, message", [
    ("item_id,title\n1,Alpha\n2,Beta,extra\n", "line 3 has 3 fields, the header 2 (an unquoted ',' inside a field?)"),
    ('item_id,title\n1,"Alpha\n2,Beta\n', "cannot be read as a table (a quoted field is never closed, or a '\"' inside "
                                          "one is not doubled)"),
    ("item_id,title,title\n1,Alpha,A\n", "the header names column 'title' twice"),
    ("", "empty file (a CSV needs a header line)"),
    ("\n\n", "empty file (a CSV needs a header line)"),
])
def test_malformed_csv_is_one_clear_error(tmp_path: Path, items_text: str, message: str) -> None:
    items, events = _write(tmp_path / "src", items=items_text)
    assert _refusal(tmp_path, items, events) == f"{items}: {message}"


def test_parquet_is_recognised_by_its_bytes_and_a_truncated_one_refused(tmp_path: Path) -> None:
    _, events = _write(tmp_path / "src")
    items = tmp_path / "src" / "items.export.csv"  # a Parquet file under another name
    pl.DataFrame({"item_id": [1, 2], "title": ["Alpha", "Beta"]}).write_parquet(items)
    assert prepare_generic(items, events, tmp_path / "cat").items["title"].to_list() == ["Alpha", "Beta"]
    truncated = tmp_path / "src" / "items.parquet"
    truncated.write_bytes(items.read_bytes()[:40])
    shutil.rmtree(tmp_path / "cat")
    message = _refusal(tmp_path, truncated, events)
    assert message.startswith(f"{truncated}: cannot be read as a table (") and "\n" not in message


def test_folder_as_items_file(tmp_path: Path) -> None:
    _, events = _write(tmp_path / "src")
    (tmp_path / "src" / "dir.csv").mkdir()
    with pytest.raises(CatalogError, match=r"dir\.csv: is a folder, not a CSV or Parquet file$"):
        prepare_generic(tmp_path / "src" / "dir.csv", events, tmp_path / "cat")


# --- Parquet column types ----------------------------------------------------------------------------------------


def _parquet(folder: Path, items: pl.DataFrame, events: pl.DataFrame) -> tuple[Path, Path]:
    folder.mkdir(parents=True, exist_ok=True)
    items.write_parquet(folder / "items.parquet")
    events.write_parquet(folder / "events.parquet")
    return folder / "items.parquet", folder / "events.parquet"


EVENTS_DF = pl.DataFrame({"user_id": [1, 1], "item_id": [1, 2], "timestamp": [100, 200]})


@pytest.mark.parametrize("column, values, expected", [
    ("title", [dt.timedelta(seconds=1)] * 2, "title' holds values of type Duration(time_unit='us'); expected text"),
    ("item_id", [b"1", b"2"], "item_id' holds values of type Binary; expected integers or text"),
    ("title", [[1], [2]], "title' holds values of type List(Int64); expected text"),
])
def test_parquet_columns_of_unusable_types_are_named(tmp_path: Path, column: str, values, expected: str) -> None:
    items_df = pl.DataFrame({"item_id": [1, 2], "title": ["a", "b"]}).with_columns(pl.Series(column, values))
    items, events = _parquet(tmp_path / "src", items_df, EVENTS_DF)
    assert _refusal(tmp_path, items, events) == f"{items}: field '{expected}"


def test_parquet_id_types_that_match_integer_items(tmp_path: Path) -> None:
    """Categorical, float (whole numbers) and uint64 interaction ids match int64 item ids."""
    items_df = pl.DataFrame({"item_id": [1, 2, 3], "title": ["a", "b", "c"]})
    events_df = pl.DataFrame({"user_id": [1, 1, 2], "item_id": pl.Series(["1", "2", "3"], dtype=pl.Categorical),
                              "timestamp": [100, 200, 300]})
    for item_ids in (events_df["item_id"], pl.Series([1.0, 2.0, 3.0]), pl.Series([1, 2, 3], dtype=pl.UInt64)):
        items, events = _parquet(tmp_path / "src", items_df, events_df.with_columns(item_ids.alias("item_id")))
        shutil.rmtree(tmp_path / "cat", ignore_errors=True)
        assert prepare_generic(items, events, tmp_path / "cat").interactions["item_id"].to_list() == [1, 2, 3]


def test_uint64_ids_beyond_int64_stay_exact_as_text(tmp_path: Path) -> None:
    big = 2**64 - 1
    items_df = pl.DataFrame({"item_id": pl.Series([1, big], dtype=pl.UInt64), "title": ["a", "b"]})
    events_df = pl.DataFrame({"user_id": [1, 1], "item_id": pl.Series([big, 1], dtype=pl.UInt64),
                              "timestamp": [100, 200]})
    items, events = _parquet(tmp_path / "src", items_df, events_df)
    catalog = prepare_generic(items, events, tmp_path / "cat")
    assert catalog.items["item_id"].to_list() == ["1", str(big)]
    assert load_catalog(tmp_path / "cat").interactions["item_id"].to_list() == [str(big), "1"]
