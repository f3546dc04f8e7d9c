"""Catalog validation, the generic and MovieLens importers, and atomic writes (data/catalog.py)."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import polars as pl
import pytest

from data.catalog import (
    CatalogError,
    load_catalog,
    validate_interactions,
    validate_items,
    write_catalog,
)
from data.importers import prepare_generic, prepare_movielens_100k, prepare_movielens_latest

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
