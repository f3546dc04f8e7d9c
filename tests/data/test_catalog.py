"""Catalog validation, the generic and MovieLens importers, and atomic writes (train/data.py)."""

from __future__ import annotations

import json
import logging
import re
import shutil
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import soundfile as sf

from data.catalog import (
    CatalogError,
    load_catalog,
    validate_interactions,
    validate_items,
    write_catalog,
)
from data.importers import prepare_generic, prepare_movielens_100k, prepare_movielens_latest
from data.media import load_image
from errors import MediaError

ITEMS_CSV = "item_id,title\n1,Alpha\n2,Beta\n3,Gamma\n"
INTERACTIONS_CSV = "user_id,item_id,timestamp\n10,1,100\n10,2,200\n11,3,300\n"


def _write(folder: Path, items: str = ITEMS_CSV, interactions: str = INTERACTIONS_CSV) -> tuple[Path, Path]:
    folder.mkdir(parents=True, exist_ok=True)
    items_path, interactions_path = folder / "items.csv", folder / "interactions.csv"
    items_path.write_text(items)
    interactions_path.write_text(interactions)
    return items_path, interactions_path


@pytest.fixture(scope="module")
def poster(sample_poster: Path) -> Path:
    """A generated 92x138 JPEG poster."""
    return sample_poster


def test_prepare_generic_valid_minimal(tmp_path: Path) -> None:
    items_path, interactions_path = _write(tmp_path / "src")
    catalog = prepare_generic(items_path, interactions_path, tmp_path / "cat")
    assert catalog.items["item_id"].to_list() == [1, 2, 3]
    assert catalog.items["title"].to_list() == ["Alpha", "Beta", "Gamma"]
    assert catalog.items["image_path"].to_list() == [None, None, None]
    assert catalog.interactions.rows() == [(10, 1, 100), (10, 2, 200), (11, 3, 300)]
    info = json.loads((tmp_path / "cat" / "catalog.json").read_text())
    assert (info["items"], info["interactions"], info["users"]) == (3, 3, 2)


# --- one test per validation error; each message names the file, the row and the field -------------------


def test_missing_item_column(tmp_path: Path) -> None:
    items_path, interactions_path = _write(tmp_path / "src", items="item_id,name\n1,Alpha\n")
    with pytest.raises(CatalogError, match=r"items\.csv: missing column 'title'") as err:
        prepare_generic(items_path, interactions_path, tmp_path / "cat")
    assert str(items_path) in str(err.value)
    assert not (tmp_path / "cat").exists()


def test_missing_interaction_column(tmp_path: Path) -> None:
    items_path, interactions_path = _write(
        tmp_path / "src", interactions="user_id,item_id,time\n10,1,100\n")
    with pytest.raises(CatalogError, match=r"interactions\.csv: missing column 'timestamp'") as err:
        prepare_generic(items_path, interactions_path, tmp_path / "cat")
    assert str(interactions_path) in str(err.value)


def test_missing_column_in_dataframe() -> None:
    with pytest.raises(CatalogError, match=r"^my-items: missing column 'item_id'"):
        validate_items(pl.DataFrame({"id": [1], "title": ["a"]}), "my-items")
    items = validate_items(pl.DataFrame({"item_id": [1], "title": ["a"]}), "my-items")
    with pytest.raises(CatalogError, match=r"^my-inter: missing column 'user_id'"):
        validate_interactions(pl.DataFrame({"item_id": [1], "timestamp": [1]}), items, "my-inter")


def test_duplicate_item_id_names_the_repeat_and_the_first_row(tmp_path: Path) -> None:
    items_path, interactions_path = _write(tmp_path / "src", items="item_id,title\n2,A\n1,B\n3,C\n2,D\n1,E\n")
    with pytest.raises(CatalogError) as err:
        prepare_generic(items_path, interactions_path, tmp_path / "cat")
    # The first repeat in file order (row 4, of row 1's id), not the first occurrence of a repeated id.
    assert str(err.value) == f"{items_path} row 4: duplicate item_id 2: row 4 repeats row 1 (field 'item_id')"


def test_empty_item_id(tmp_path: Path) -> None:
    items_path, interactions_path = _write(tmp_path / "src", items="item_id,title\n1,A\n,B\n")
    with pytest.raises(CatalogError, match=r"items\.csv row 2: empty field 'item_id'"):
        prepare_generic(items_path, interactions_path, tmp_path / "cat")


def test_interaction_with_unknown_item(tmp_path: Path) -> None:
    items_path, interactions_path = _write(
        tmp_path / "src", interactions="user_id,item_id,timestamp\n10,1,100\n10,2,200\n11,99,300\n")
    with pytest.raises(CatalogError, match=r"interactions\.csv row 3: item_id 99 is not in the items table") as err:
        prepare_generic(items_path, interactions_path, tmp_path / "cat")
    assert str(interactions_path) in str(err.value)


def test_unknown_items_dropped_on_request(tmp_path: Path) -> None:
    items_path, interactions_path = _write(
        tmp_path / "src", interactions="user_id,item_id,timestamp\n10,1,100\n10,99,200\n11,3,300\n")
    catalog = prepare_generic(items_path, interactions_path, tmp_path / "cat", drop_unknown_items=True)
    assert catalog.interactions.rows() == [(10, 1, 100), (11, 3, 300)]


def test_unreadable_timestamp(tmp_path: Path) -> None:
    items_path, interactions_path = _write(
        tmp_path / "src",
        interactions="user_id,item_id,timestamp\n10,1,2020-01-01T10:00:00\n10,2,yesterday\n")
    with pytest.raises(CatalogError, match=r"interactions\.csv row 2: unreadable timestamp 'yesterday' "
                                           r"in field 'timestamp'") as err:
        prepare_generic(items_path, interactions_path, tmp_path / "cat")
    assert str(interactions_path) in str(err.value)


def test_unreadable_timestamp_among_unix_seconds(tmp_path: Path) -> None:
    items_path, interactions_path = _write(
        tmp_path / "src", interactions="user_id,item_id,timestamp\n10,1,100\n10,2,yesterday\n")
    with pytest.raises(CatalogError, match=r"interactions\.csv row 2: unreadable timestamp 'yesterday' "
                                           r"in field 'timestamp'"):
        prepare_generic(items_path, interactions_path, tmp_path / "cat")


def test_unix_seconds_stored_as_strings() -> None:
    items = validate_items(pl.DataFrame({"item_id": [1], "title": ["a"]}), "items")
    df = pl.DataFrame({"user_id": [1, 1], "item_id": [1, 1], "timestamp": ["1577836800", " 1577836801 "]})
    assert validate_interactions(df, items, "inter")["timestamp"].to_list() == [1577836800, 1577836801]


def test_media_path_outside_media_folder(tmp_path: Path, poster: Path) -> None:
    src = tmp_path / "src"
    (src / "posters").mkdir(parents=True)
    shutil.copyfile(poster, src / "posters" / "1.jpg")
    shutil.copyfile(poster, tmp_path / "x.jpg")  # exists, but outside the media folder
    items_path, interactions_path = _write(
        src, items="item_id,title,image_path\n1,A,posters/1.jpg\n2,B,../x.jpg\n3,C,\n")
    with pytest.raises(CatalogError, match=r"items\.csv row 2: image_path '\.\./x\.jpg' is outside the media folder"):
        prepare_generic(items_path, interactions_path, tmp_path / "cat")
    assert not (tmp_path / "cat").exists()


def test_absolute_media_path_rejected(tmp_path: Path, poster: Path) -> None:
    items_path, interactions_path = _write(tmp_path / "src", items=f"item_id,title,image_path\n1,A,{poster}\n")
    with pytest.raises(CatalogError, match=r"row 1: image_path '.*1\.jpg' is outside the media folder"):
        prepare_generic(items_path, interactions_path, tmp_path / "cat")


def test_media_path_outside_catalog_folder(tmp_path: Path) -> None:
    items = pl.DataFrame({"item_id": [1, 2], "title": ["a", "b"], "image_path": [None, "../x.jpg"]})
    interactions = pl.DataFrame({"user_id": [1], "item_id": [1], "timestamp": [5]})
    with pytest.raises(CatalogError, match=r"^items row 2: image_path '\.\./x\.jpg' is outside the catalog folder"):
        write_catalog(tmp_path / "cat", items, interactions)
    assert not (tmp_path / "cat").exists()


def test_rejected_media_is_not_written_outside_catalog(tmp_path: Path, poster: Path) -> None:
    items = pl.DataFrame({"item_id": [1], "title": ["a"], "image_path": ["../x.jpg"]})
    interactions = pl.DataFrame({"user_id": [1], "item_id": [1], "timestamp": [5]})
    with pytest.raises(CatalogError, match="outside the catalog folder"):
        write_catalog(tmp_path / "cat", items, interactions, media={"../x.jpg": poster})
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_media_file_missing(tmp_path: Path) -> None:
    src = tmp_path / "src"
    (src / "posters").mkdir(parents=True)
    items_path, interactions_path = _write(src, items="item_id,title,image_path\n1,A,\n2,B,posters/none.jpg\n")
    with pytest.raises(CatalogError, match=r"items\.csv row 2: image_path 'posters/none\.jpg' does not exist under"):
        prepare_generic(items_path, interactions_path, tmp_path / "cat")


def test_media_file_missing_in_catalog(tmp_path: Path) -> None:
    items = pl.DataFrame({"item_id": [1], "title": ["a"], "audio_path": ["media/a.ogg"]})
    interactions = pl.DataFrame({"user_id": [1], "item_id": [1], "timestamp": [5]})
    with pytest.raises(CatalogError, match=r"^items row 1: audio_path 'media/a\.ogg' does not exist under"):
        write_catalog(tmp_path / "cat", items, interactions)


def test_load_catalog_missing_folder(tmp_path: Path) -> None:
    with pytest.raises(CatalogError, match="catalog folder not found"):
        load_catalog(tmp_path / "nothing")


# --- generic prepare ---------------------------------------------------------------------------------------


def test_prepare_generic_with_mapping_and_media(tmp_path: Path, poster: Path) -> None:
    src = tmp_path / "src"
    (src / "media" / "posters").mkdir(parents=True)
    shutil.copyfile(poster, src / "media" / "posters" / "toy.jpg")
    items_csv = src / "movies.csv"
    items_csv.write_text('movieId,name,plot,poster\n1,Toy Story,"Toys, alive",posters/toy.jpg\n2,Heat,,\n')
    ratings_csv = src / "ratings.csv"
    ratings_csv.write_text("uid,movieId,ts,stars\n7,1,1000,4.5\n7,2,1001,3\n8,2,999,5\n")
    mapping = {"movieId": "item_id", "name": "title", "plot": "text", "poster": "image_path",
               "uid": "user_id", "ts": "timestamp", "stars": "rating"}
    out = tmp_path / "cat"
    catalog = prepare_generic(items_csv, ratings_csv, out, mapping=mapping, media_root=src / "media")

    assert catalog.items.select("item_id", "title", "text", "image_path").rows() == [
        (1, "Toy Story", "Toys, alive", "media/posters/toy.jpg"),
        (2, "Heat", None, None),
    ]
    assert (out / "media" / "posters" / "toy.jpg").read_bytes() == poster.read_bytes()
    assert catalog.media_path("media/posters/toy.jpg") == out / "media" / "posters" / "toy.jpg"
    assert catalog.interactions.rows() == [(7, 1, 1000, 4.5), (7, 2, 1001, 3.0), (8, 2, 999, 5.0)]
    assert catalog.interactions.schema["timestamp"] == pl.Int64
    assert catalog.interactions.schema["rating"] == pl.Float64

    reloaded = load_catalog(out)
    assert reloaded.items.equals(catalog.items)
    assert reloaded.interactions.equals(catalog.interactions)
    info = json.loads((out / "catalog.json").read_text())
    assert info == {"source": str(items_csv), "items": 2, "interactions": 3, "users": 2}


def test_iso_string_timestamps(tmp_path: Path) -> None:
    items_path, interactions_path = _write(
        tmp_path / "src",
        interactions="user_id,item_id,timestamp\n10,1,2020-01-01T10:00:00\n10,2,2020-01-02 11:00:00\n"
                     "11,3,2020-01-03T00:00:00.500\n")
    catalog = prepare_generic(items_path, interactions_path, tmp_path / "cat")
    # 2020-01-01T00:00:00Z is 1577836800
    assert catalog.interactions["timestamp"].to_list() == [
        1577836800 + 10 * 3600, 1577836800 + 86400 + 11 * 3600, 1577836800 + 2 * 86400]


def test_iso_date_and_timezone_timestamps() -> None:
    items = validate_items(pl.DataFrame({"item_id": [1], "title": ["a"]}), "items")
    for values, expected in [
        (["2020-01-01", "2020-01-02"], [1577836800, 1577923200]),
        (["2020-01-01T10:00:00+02:00"] * 2, [1577836800 + 8 * 3600] * 2),
        (["2020-01-01T10:00:00Z"] * 2, [1577836800 + 10 * 3600] * 2),
        ([" 5", "2020-01-01"], [5, 1577836800]),  # unix seconds and dates mixed
    ]:
        df = pl.DataFrame({"user_id": [1, 1], "item_id": [1, 1], "timestamp": values})
        assert validate_interactions(df, items, "inter")["timestamp"].to_list() == expected, values


def test_string_ids_keep_leading_zeros_in_dataframes(tmp_path: Path) -> None:
    items = pl.DataFrame({"item_id": ["007", "7", "010"], "title": ["Bond", "Seven", "Ten"]})
    interactions = pl.DataFrame({"user_id": ["001", "001", "01"], "item_id": ["007", "010", "7"],
                                 "timestamp": [1, 2, 3]})
    write_catalog(tmp_path / "cat", items, interactions)
    catalog = load_catalog(tmp_path / "cat")
    assert catalog.items["item_id"].to_list() == ["007", "7", "010"]
    assert catalog.interactions.select("user_id", "item_id").rows() == [("001", "007"), ("001", "010"), ("01", "7")]


def test_string_ids_keep_leading_zeros_from_parquet(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    pl.DataFrame({"item_id": ["007", "010"], "title": ["Bond", "Ten"]}).write_parquet(src / "items.parquet")
    pl.DataFrame({"user_id": ["001", "002"], "item_id": ["010", "007"], "timestamp": [1, 2]}).write_parquet(
        src / "interactions.parquet")
    catalog = prepare_generic(src / "items.parquet", src / "interactions.parquet", tmp_path / "cat")
    assert catalog.items["item_id"].to_list() == ["007", "010"]
    assert catalog.interactions.select("user_id", "item_id").rows() == [("001", "010"), ("002", "007")]


def test_string_ids_keep_leading_zeros_from_csv(tmp_path: Path) -> None:
    items_path, interactions_path = _write(
        tmp_path / "src", items="item_id,title\n007,Bond\n010,Ten\n",
        interactions="user_id,item_id,timestamp\n001,007,1\n002,010,2\n")
    catalog = prepare_generic(items_path, interactions_path, tmp_path / "cat")
    assert catalog.items["item_id"].to_list() == ["007", "010"]
    assert catalog.interactions.select("user_id", "item_id").rows() == [("001", "007"), ("002", "010")]


# --- atomic write ------------------------------------------------------------------------------------------


def test_failed_write_keeps_existing_catalog(tmp_path: Path) -> None:
    out = tmp_path / "cat"
    items = pl.DataFrame({"item_id": [1, 2], "title": ["a", "b"]})
    interactions = pl.DataFrame({"user_id": [1, 1], "item_id": [1, 2], "timestamp": [5, 6]})
    write_catalog(out, items, interactions, meta={"version": 1})
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    bad_items = pl.DataFrame({"item_id": [1, 1], "title": ["x", "y"]})
    with pytest.raises(CatalogError, match="duplicate item_id 1"):
        write_catalog(out, bad_items, interactions, meta={"version": 2}, overwrite=True)
    bad_interactions = pl.DataFrame({"user_id": [1], "item_id": [3], "timestamp": [7]})
    with pytest.raises(CatalogError, match="item_id 3 is not in the items table"):
        write_catalog(out, items, bad_interactions, meta={"version": 2}, overwrite=True)

    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert [p.name for p in tmp_path.iterdir()] == ["cat"]  # no temporary folders left behind
    catalog = load_catalog(out)
    assert catalog.items.select("item_id", "title").rows() == [(1, "a"), (2, "b")]
    assert catalog.interactions.rows() == [(1, 1, 5), (1, 2, 6)]
    assert json.loads((out / "catalog.json").read_text())["version"] == 1


def test_successful_write_replaces_existing_catalog(tmp_path: Path) -> None:
    out = tmp_path / "cat"
    interactions = pl.DataFrame({"user_id": [1], "item_id": [1], "timestamp": [5]})
    write_catalog(out, pl.DataFrame({"item_id": [1, 2], "title": ["a", "b"]}), interactions)
    write_catalog(out, pl.DataFrame({"item_id": [1], "title": ["z"]}), interactions, overwrite=True)
    assert load_catalog(out).items.select("item_id", "title").rows() == [(1, "z")]
    assert [p.name for p in tmp_path.iterdir()] == ["cat"]


# --- MovieLens importers on the real data ------------------------------------------------------------------


def test_movielens_100k_importer(ml100k_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "ml100k"
    catalog = prepare_movielens_100k(ml100k_dir, out)
    items, interactions = catalog.items, catalog.interactions
    assert items.height == 1682
    assert items["item_id"].to_list() == list(range(1, 1683))
    assert interactions.height == 100000
    assert interactions["user_id"].n_unique() == 943
    assert interactions.schema["timestamp"] == pl.Int64
    assert interactions["rating"].is_between(1, 5).all()

    toy = items.row(0, named=True)
    assert toy["title"] == "Toy Story (1995)"
    assert toy["genres"] == "Animation, Children, Comedy"
    assert toy["text"].startswith("Led by Woody")
    assert toy["image_path"] == "media/posters/1.jpg"
    assert items.filter(pl.col("item_id") == 543)["title"][0] == "Misérables, Les (1995)"  # Latin-1 decoded

    with_image = items.filter(pl.col("image_path").is_not_null())
    assert with_image.height > 1600
    for item_id, rel in with_image.select("item_id", "image_path").iter_rows():
        assert rel == f"media/posters/{item_id}.jpg"
        assert (out / rel).is_file()
    assert items.filter(pl.col("text").str.len_chars() > 0).height > 1600

    reloaded = load_catalog(out)
    assert reloaded.items.equals(items) and reloaded.interactions.equals(interactions)
    info = json.loads((out / "catalog.json").read_text())
    assert (info["dataset"], info["items"], info["interactions"], info["users"]) == (
        "movielens-100k", 1682, 100000, 943)


def test_movielens_100k_importer_missing_files(tmp_path: Path) -> None:
    with pytest.raises(CatalogError, match=re.escape(str(tmp_path / "u.data")) + ": file not found"):
        prepare_movielens_100k(tmp_path, tmp_path / "out")


def test_movielens_latest_importer(shared_datasets: Path, tmp_path: Path) -> None:
    src = shared_datasets / "movielens-latest-small"
    ratings = pl.read_csv(src / "ratings.csv")
    movies = pl.read_csv(src / "movies.csv")
    unknown = ratings.filter(~pl.col("movieId").is_in(movies["movieId"].implode()))
    assert unknown.height >= 1  # this copy holds at least one rating of a movie missing from movies.csv

    catalog = prepare_movielens_latest(src, tmp_path / "latest")
    assert catalog.items.height == 9742
    assert catalog.interactions.height == ratings.height - unknown.height == 100836
    assert not catalog.interactions["item_id"].is_in(unknown["movieId"].implode()).any()
    assert catalog.interactions["user_id"].n_unique() == 610
    first = catalog.items.row(0, named=True)
    assert (first["item_id"], first["title"]) == (1, "Toy Story (1995)")
    assert first["genres"] == "Adventure, Animation, Children, Comedy, Fantasy"


def test_movielens_latest_drops_ratings_of_missing_movies(shared_datasets: Path, tmp_path: Path) -> None:
    """Take the real files, remove movie 1 from movies.csv: its 215 ratings must go, nothing else."""
    src_real = shared_datasets / "movielens-latest-small"
    src = tmp_path / "src"
    src.mkdir()
    movies = pl.read_csv(src_real / "movies.csv")
    movies.filter(pl.col("movieId") != 1).write_csv(src / "movies.csv")
    shutil.copyfile(src_real / "ratings.csv", src / "ratings.csv")
    known = pl.read_csv(src / "ratings.csv").filter(pl.col("movieId").is_in(movies["movieId"].implode()))

    catalog = prepare_movielens_latest(src, tmp_path / "latest")
    assert catalog.items.height == 9741
    assert catalog.interactions.height == known.height - known.filter(pl.col("movieId") == 1).height
    assert known.filter(pl.col("movieId") == 1).height == 215
    assert 1 not in catalog.interactions["item_id"].to_list()


# --- ratings -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("cell, shown", [("NaN", "'NaN'"), ("nan", "'nan'"), ("four", "'four'"), ("inf", "'inf'"),
                                         ("4,5", "'4,5'")])
def test_bad_rating_refused(tmp_path: Path, cell: str, shown: str) -> None:
    items_path, interactions_path = _write(
        tmp_path / "src", interactions=f'user_id,item_id,timestamp,rating\n10,1,100,4\n10,2,200,"{cell}"\n')
    with pytest.raises(CatalogError) as err:
        prepare_generic(items_path, interactions_path, tmp_path / "cat")
    assert str(err.value) == f"{interactions_path} row 2: rating {shown} is not a finite number (field 'rating')"
    assert not (tmp_path / "cat").exists()


def test_empty_rating_refused(tmp_path: Path) -> None:
    items_path, interactions_path = _write(
        tmp_path / "src", interactions="user_id,item_id,timestamp,rating\n10,1,100,4\n10,2,200,5\n11,3,300,\n")
    with pytest.raises(CatalogError, match=re.escape(f"{interactions_path} row 3: empty field 'rating' (rate every "
                                                     "interaction, or leave the rating column out)")):
        prepare_generic(items_path, interactions_path, tmp_path / "cat")


def test_nan_rating_in_dataframe_refused() -> None:
    items = validate_items(pl.DataFrame({"item_id": [1], "title": ["a"]}), "items")
    df = pl.DataFrame({"user_id": [1, 1], "item_id": [1, 1], "timestamp": [1, 2], "rating": [3.0, float("nan")]})
    with pytest.raises(CatalogError, match=r"^inter row 2: rating nan is not a finite number"):
        validate_interactions(df, items, "inter")
    df = df.with_columns(pl.Series("rating", [3.0, None]))
    with pytest.raises(CatalogError, match=r"^inter row 2: empty field 'rating'"):
        validate_interactions(df, items, "inter")


def test_ratings_as_text_become_floats(tmp_path: Path) -> None:
    items_path, interactions_path = _write(
        tmp_path / "src", interactions="user_id,item_id,timestamp,rating\n10,1,100, 4.5\n10,2,200,3\n11,3,300,-1e0\n")
    catalog = prepare_generic(items_path, interactions_path, tmp_path / "cat")
    assert catalog.interactions["rating"].to_list() == [4.5, 3.0, -1.0]
    assert catalog.interactions.schema["rating"] == pl.Float64


# --- empty tables ------------------------------------------------------------------------------------------


def test_header_only_interactions_refused(tmp_path: Path) -> None:
    items_path, interactions_path = _write(tmp_path / "src", interactions="user_id,item_id,timestamp\n")
    with pytest.raises(CatalogError) as err:
        prepare_generic(items_path, interactions_path, tmp_path / "cat")
    assert str(err.value) == (f"{interactions_path}: no rows (the interactions table needs at least one "
                              "interaction)")
    assert not (tmp_path / "cat").exists()


def test_header_only_items_refused(tmp_path: Path) -> None:
    items_path, interactions_path = _write(tmp_path / "src", items="item_id,title\n")
    with pytest.raises(CatalogError) as err:
        prepare_generic(items_path, interactions_path, tmp_path / "cat")
    assert str(err.value) == f"{items_path}: no rows (the items table needs at least one item)"


def test_empty_dataframes_refused_by_write_catalog(tmp_path: Path) -> None:
    items = pl.DataFrame({"item_id": [1], "title": ["a"]})
    no_interactions = pl.DataFrame(schema={"user_id": pl.Int64, "item_id": pl.Int64, "timestamp": pl.Int64})
    with pytest.raises(CatalogError, match=r"^interactions: no rows"):
        write_catalog(tmp_path / "cat", items, no_interactions)
    with pytest.raises(CatalogError, match=r"^items: no rows"):
        write_catalog(tmp_path / "cat", items.clear(), no_interactions)
    assert not (tmp_path / "cat").exists()


# --- timestamp scales --------------------------------------------------------------------------------------

T0 = 1_700_000_000  # 2023-11-14, unix seconds


@pytest.mark.parametrize("scale, factor", [("milliseconds", 10**3), ("microseconds", 10**6),
                                           ("nanoseconds", 10**9)])
def test_subsecond_unix_timestamps_converted_with_warning(tmp_path: Path, caplog: pytest.LogCaptureFixture,
                                                          scale: str, factor: int) -> None:
    values = [T0 * factor, T0 * factor + factor // 2, (T0 + 7) * factor]
    items_path, interactions_path = _write(
        tmp_path / "src", interactions="user_id,item_id,timestamp\n" + "".join(
            f"10,{i},{v}\n" for i, v in enumerate(values, start=1)))
    with caplog.at_level(logging.WARNING):
        catalog = prepare_generic(items_path, interactions_path, tmp_path / "cat")
    assert catalog.interactions["timestamp"].to_list() == [T0, T0, T0 + 7]
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1, warnings
    assert warnings[0].startswith(f"{interactions_path}: timestamps look like unix {scale} (largest {values[-1]}, ")
    assert warnings[0].endswith("converted 3 rows to seconds")


def test_millisecond_timestamps_as_numbers(caplog: pytest.LogCaptureFixture) -> None:
    items = validate_items(pl.DataFrame({"item_id": [1], "title": ["a"]}), "items")
    for column in ([T0 * 1000, T0 * 1000 + 1999], [T0 * 1000.0, T0 * 1000 + 1999.5]):  # int64, then float64
        df = pl.DataFrame({"user_id": [1, 1], "item_id": [1, 1], "timestamp": column})
        with caplog.at_level(logging.WARNING):
            assert validate_interactions(df, items, "inter")["timestamp"].to_list() == [T0, T0 + 1]
    assert sum("look like unix milliseconds" in r.getMessage() for r in caplog.records) == 2


def test_second_timestamps_not_converted(caplog: pytest.LogCaptureFixture) -> None:
    items = validate_items(pl.DataFrame({"item_id": [1], "title": ["a"]}), "items")
    df = pl.DataFrame({"user_id": [1, 1, 1], "item_id": [1, 1, 1], "timestamp": ["5", "1577836800.7", "2020-01-01"]})
    with caplog.at_level(logging.WARNING):
        assert validate_interactions(df, items, "inter")["timestamp"].to_list() == [5, 1577836800, 1577836800]
    assert caplog.records == []


def test_mixed_timestamp_scales_refused(tmp_path: Path) -> None:
    items_path, interactions_path = _write(
        tmp_path / "src", interactions=f"user_id,item_id,timestamp\n10,1,{T0}\n10,2,{T0 + 5}\n11,3,{T0 * 1000}\n"
                                       f"11,1,{T0 * 1000 + 1}\n")
    with pytest.raises(CatalogError) as err:
        prepare_generic(items_path, interactions_path, tmp_path / "cat")
    assert str(err.value) == (f"{interactions_path} row 3: timestamp '{T0 * 1000}' looks like unix milliseconds but "
                              f"row 1 ('{T0}') looks like unix seconds; field 'timestamp' must use one scale")


def test_nan_timestamp_unreadable() -> None:
    items = validate_items(pl.DataFrame({"item_id": [1], "title": ["a"]}), "items")
    df = pl.DataFrame({"user_id": [1, 1], "item_id": [1, 1], "timestamp": [1.0, float("nan")]})
    with pytest.raises(CatalogError, match=r"^inter row 2: unreadable timestamp nan in field 'timestamp'"):
        validate_interactions(df, items, "inter")


# --- media are decoded when the catalog is written ---------------------------------------------------------


@pytest.fixture(scope="module")
def clip(sample_clips: list[Path]) -> Path:
    """A generated 5.5 s Ogg Vorbis clip."""
    return sample_clips[2]


def _media_src(tmp_path: Path, image: bytes | None = None, audio: tuple[str, bytes] | None = None) -> tuple[Path, Path]:
    """Items with media in row 2 (item 'b'): a made-up image and/or audio file; row 1 has none."""
    src = tmp_path / "src"
    (src / "m").mkdir(parents=True)
    image_cell = audio_cell = ""
    if image is not None:
        (src / "m" / "b.jpg").write_bytes(image)
        image_cell = "m/b.jpg"
    if audio is not None:
        (src / "m" / audio[0]).write_bytes(audio[1])
        audio_cell = f"m/{audio[0]}"
    return _write(src, items=f"item_id,title,image_path,audio_path\na,A,,\nb,B,{image_cell},{audio_cell}\n",
                  interactions="user_id,item_id,timestamp\n1,a,5\n1,b,6\n")


def _prepare_error(tmp_path: Path, items_path: Path, interactions_path: Path) -> str:
    with pytest.raises(MediaError) as err:
        prepare_generic(items_path, interactions_path, tmp_path / "cat")
    assert not (tmp_path / "cat").exists()
    assert "\n" not in str(err.value)
    return str(err.value)


def test_prepare_refuses_truncated_jpeg(tmp_path: Path, poster: Path) -> None:
    data = poster.read_bytes()
    items_path, interactions_path = _media_src(tmp_path, image=data[: len(data) * 2 // 3])
    message = _prepare_error(tmp_path, items_path, interactions_path)
    assert message.startswith(f"{items_path} row 2: item_id 'b', field 'image_path': {items_path.parent}/m/b.jpg: "
                              "cannot decode image (image file is truncated")


def test_prepare_refuses_garbled_jpeg(tmp_path: Path, poster: Path) -> None:
    data = bytearray(poster.read_bytes())
    data[2:400] = bytes(398)  # the JPEG headers (quantisation and Huffman tables) zeroed
    items_path, interactions_path = _media_src(tmp_path, image=bytes(data))
    message = _prepare_error(tmp_path, items_path, interactions_path)
    assert message.startswith(f"{items_path} row 2: item_id 'b', field 'image_path': {items_path.parent}/m/b.jpg: "
                              "cannot decode image (")


def test_prepare_refuses_truncated_ogg(tmp_path: Path, clip: Path) -> None:
    data = clip.read_bytes()
    items_path, interactions_path = _media_src(tmp_path, audio=("b.ogg", data[: len(data) // 2]))
    message = _prepare_error(tmp_path, items_path, interactions_path)
    assert message.startswith(f"{items_path} row 2: item_id 'b', field 'audio_path': {items_path.parent}/m/b.ogg: "
                              "truncated Ogg file: the page at byte ")


def test_prepare_refuses_garbled_ogg(tmp_path: Path, clip: Path) -> None:
    data = bytearray(clip.read_bytes())
    middle = len(data) // 2
    data[middle:middle + 64] = bytes(range(64))  # libvorbis would skip the damaged page without a word
    items_path, interactions_path = _media_src(tmp_path, audio=("b.ogg", bytes(data)))
    message = _prepare_error(tmp_path, items_path, interactions_path)
    assert re.fullmatch(re.escape(f"{items_path} row 2: item_id 'b', field 'audio_path': {items_path.parent}/m/b.ogg: "
                                  "corrupt Ogg file: ") + r".* at byte \d+.*", message), message


def test_prepare_refuses_truncated_wav(tmp_path: Path) -> None:
    wav = tmp_path / "tone.wav"
    sf.write(str(wav), np.sin(np.arange(16000, dtype=np.float32) / 10), 16000, subtype="PCM_16")
    data = wav.read_bytes()
    items_path, interactions_path = _media_src(tmp_path, audio=("b.wav", data[: len(data) // 2]))
    message = _prepare_error(tmp_path, items_path, interactions_path)
    assert message == (f"{items_path} row 2: item_id 'b', field 'audio_path': {items_path.parent}/m/b.wav: "
                       f"truncated WAV file: its data chunk declares 32000 bytes, {len(data) // 2 - 44} are present")


def test_prepare_accepts_good_media(tmp_path: Path, poster: Path, clip: Path) -> None:
    items_path, interactions_path = _media_src(tmp_path, image=poster.read_bytes(), audio=("b.ogg", clip.read_bytes()))
    catalog = prepare_generic(items_path, interactions_path, tmp_path / "cat")
    assert catalog.items.select("image_path", "audio_path").row(1) == ("media/m/b.jpg", "media/m/b.ogg")


def test_write_catalog_refuses_corrupt_media(tmp_path: Path, poster: Path) -> None:
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(poster.read_bytes()[:600])
    items = pl.DataFrame({"item_id": [7, 8], "title": ["a", "b"], "image_path": ["media/ok.jpg", "media/bad.jpg"]})
    interactions = pl.DataFrame({"user_id": [1], "item_id": [7], "timestamp": [5]})
    with pytest.raises(MediaError, match=re.escape(f"items row 2: item_id 8, field 'image_path': {bad}: "
                                                   "cannot decode image")):
        write_catalog(tmp_path / "cat", items, interactions, media={"media/ok.jpg": poster, "media/bad.jpg": bad})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.jpg"]


# --- media paths of a stored catalog are confined when it is loaded -----------------------------------------


def _stored_catalog(tmp_path: Path, poster: Path) -> Path:
    out = tmp_path / "cat"
    items = pl.DataFrame({"item_id": [1, 2], "title": ["a", "b"], "image_path": ["media/1.jpg", None]})
    interactions = pl.DataFrame({"user_id": [1, 1], "item_id": [1, 2], "timestamp": [5, 6]})
    write_catalog(out, items, interactions, media={"media/1.jpg": poster})
    return out


def _hand_edit_image_path(root: Path, value: str) -> None:
    items = pl.read_parquet(root / "items.parquet")
    items.with_columns(pl.Series("image_path", [items["image_path"][0], value])).write_parquet(root / "items.parquet")


@pytest.mark.parametrize("value", ["/etc/passwd", "../x.jpg", "media/../../x.jpg"])
def test_load_refuses_hand_edited_media_path(tmp_path: Path, poster: Path, value: str) -> None:
    root = _stored_catalog(tmp_path, poster)
    shutil.copyfile(poster, tmp_path / "x.jpg")
    _hand_edit_image_path(root, value)
    with pytest.raises(CatalogError) as err:
        load_catalog(root)
    assert str(err.value) == (f"{root / 'items.parquet'} row 2: image_path {value!r} is outside the catalog folder "
                              "(media paths are relative, without '..')")


def test_load_refuses_symlink_out_of_catalog(tmp_path: Path, poster: Path) -> None:
    root = _stored_catalog(tmp_path, poster)
    shutil.copyfile(poster, tmp_path / "outside.jpg")
    (root / "media" / "link.jpg").symlink_to(tmp_path / "outside.jpg")
    _hand_edit_image_path(root, "media/link.jpg")
    with pytest.raises(CatalogError) as err:
        load_catalog(root)
    assert str(err.value) == (f"{root / 'items.parquet'} row 2: image_path 'media/link.jpg' is outside the catalog "
                              f"folder {root}")


def test_media_path_refuses_escapes_at_decode_time(tmp_path: Path, poster: Path) -> None:
    """Catalog.media_path confines each path again when it resolves it (a symlink may appear after loading)."""
    root = _stored_catalog(tmp_path, poster)
    catalog = load_catalog(root)
    assert catalog.media_path("media/1.jpg") == root / "media" / "1.jpg"
    assert catalog.media_path(None) is None
    (root / "media" / "link.jpg").symlink_to(tmp_path)
    for value, why in [("/etc/passwd", "must be relative"), ("../x.jpg", "must be relative"),
                       ("media/link.jpg/x.jpg", "resolves outside the catalog folder")]:
        with pytest.raises(MediaError, match=re.escape(f"{root / 'items.parquet'}: media path {value!r} {why}")):
            catalog.media_path(value)


def test_load_tolerates_missing_media_file_until_decoded(tmp_path: Path, poster: Path) -> None:
    root = _stored_catalog(tmp_path, poster)
    (root / "media" / "1.jpg").unlink()
    catalog = load_catalog(root)  # a missing file is reported by decoding, which names it
    with pytest.raises(MediaError, match=re.escape(f"{root / 'media' / '1.jpg'}: cannot decode image")):
        load_image(catalog.media_path("media/1.jpg"), 8, (0.5,) * 3, (0.5,) * 3)
