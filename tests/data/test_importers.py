"""Importers (data/importers.py): --map renames, dropped rows and their warnings, media checks per format."""

from __future__ import annotations

import logging
import re
import shutil
from pathlib import Path

import pytest

import cli
from data.importers import prepare, prepare_generic, prepare_movielens_100k, prepare_movielens_latest
from errors import CatalogError, MediaError


def _write(folder: Path, items: str, interactions: str) -> tuple[Path, Path]:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "items.csv").write_text(items)
    (folder / "interactions.csv").write_text(interactions)
    return folder / "items.csv", folder / "interactions.csv"


def _warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]


@pytest.fixture(scope="module")
def poster(sample_poster: Path) -> Path:
    """A generated 92x138 JPEG poster."""
    return sample_poster


# --- --map ---------------------------------------------------------------------------------------------


def test_map_onto_existing_column_is_a_catalog_error(tmp_path: Path) -> None:
    items, interactions = _write(tmp_path / "src", "item_id,name,title\n1,Alpha,A\n",
                                 "user_id,item_id,timestamp\n10,1,100\n")
    with pytest.raises(CatalogError) as err:
        prepare_generic(items, interactions, tmp_path / "cat", mapping={"name": "title"})
    message = str(err.value)
    assert message.startswith(f"{items}: --map name=title renames column 'name' onto column 'title', "
                              "which the file already has")
    assert "\n" not in message
    assert not (tmp_path / "cat").exists()


def test_map_onto_existing_column_via_cli_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    items, interactions = _write(tmp_path / "src", "item_id,name,title\n1,Alpha,A\n",
                                 "user_id,item_id,timestamp\n10,1,100\n")
    code = cli.main(["prepare", "--format", "generic", "--items", str(items), "--interactions", str(interactions),
                     "--map", "name=title", "--out", str(tmp_path / "cat")])
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "Traceback" not in err[0], err
    assert str(items) in err[0] and "'name'" in err[0] and "'title'" in err[0]


def test_map_source_column_in_neither_file(tmp_path: Path) -> None:
    items, interactions = _write(tmp_path / "src", "item_id,title\n1,A\n", "user_id,item_id,timestamp\n10,1,100\n")
    with pytest.raises(CatalogError, match=r"^--map nope=title: column 'nope' is in neither table") as err:
        prepare(format="generic", out=tmp_path / "cat", items=items, interactions=interactions,
                mapping={"nope": "title"})
    assert str(items) in str(err.value) and str(interactions) in str(err.value)


def test_map_two_columns_onto_one(tmp_path: Path) -> None:
    items, interactions = _write(tmp_path / "src", "item_id,name,label\n1,A,a\n",
                                 "user_id,item_id,timestamp\n10,1,100\n")
    with pytest.raises(CatalogError, match=r"items\.csv: --map name=title and --map label=title both rename onto "
                                           r"column 'title'"):
        prepare_generic(items, interactions, tmp_path / "cat", mapping={"name": "title", "label": "title"})


def test_map_swap_and_shared_column_are_allowed(tmp_path: Path) -> None:
    # "title" holds the subtitle and "name" the title: a swap renames onto an existing column legitimately.
    items, interactions = _write(tmp_path / "src", "movieId,title,name\n1,sub,Alpha\n",
                                 "user_id,movieId,timestamp\n10,1,100\n")
    catalog = prepare_generic(items, interactions, tmp_path / "cat",
                              mapping={"movieId": "item_id", "name": "title", "title": "name"})
    assert catalog.items.select("item_id", "title", "name").rows() == [(1, "Alpha", "sub")]
    assert catalog.interactions["item_id"].to_list() == [1]  # movieId renamed in both files


# --- dropped rows: only when asked (generic) or by protocol (movielens-latest), always with a WARNING ----


def test_unknown_items_refused_unless_asked(tmp_path: Path) -> None:
    items, interactions = _write(tmp_path / "src", "item_id,title\n1,A\n2,B\n",
                                 "user_id,item_id,timestamp\n10,1,100\n10,9,200\n11,2,300\n")
    with pytest.raises(CatalogError, match=r"interactions\.csv row 2: item_id 9 is not in the items table"):
        prepare("generic", tmp_path / "cat", items=items, interactions=interactions)
    assert not (tmp_path / "cat").exists()


def test_drop_unknown_items_warns_with_count(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    items, interactions = _write(tmp_path / "src", "item_id,title\n1,A\n2,B\n",
                                 "user_id,item_id,timestamp\n10,1,100\n10,9,200\n11,2,300\n11,8,400\n")
    with caplog.at_level(logging.WARNING):
        catalog = prepare("generic", tmp_path / "cat", items=items, interactions=interactions,
                          drop_unknown_items=True)
    assert catalog.interactions.select("user_id", "item_id").rows() == [(10, 1), (11, 2)]
    assert _warnings(caplog) == [f"{interactions}: dropping 2 of 4 interactions whose item_id is not in {items} "
                                 "(--drop-unknown-items)"]


def test_drop_unknown_items_silent_when_nothing_dropped(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    items, interactions = _write(tmp_path / "src", "item_id,title\n1,A\n", "user_id,item_id,timestamp\n10,1,100\n")
    with caplog.at_level(logging.WARNING):
        prepare_generic(items, interactions, tmp_path / "cat", drop_unknown_items=True)
    assert _warnings(caplog) == []


def test_drop_unknown_items_dropping_everything_is_an_error(tmp_path: Path) -> None:
    items, interactions = _write(tmp_path / "src", "item_id,title\n1,A\n", "user_id,item_id,timestamp\n10,7,100\n")
    with pytest.raises(CatalogError, match=r"interactions\.csv: none of its 1 interactions has an item_id in "):
        prepare_generic(items, interactions, tmp_path / "cat", drop_unknown_items=True)


def test_movielens_latest_drops_by_protocol_and_warns(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    src = tmp_path / "latest"
    src.mkdir()
    (src / "movies.csv").write_text("movieId,title,genres\n1,Alpha (1995),Comedy|Drama\n2,Beta (1996),Action\n")
    (src / "ratings.csv").write_text("userId,movieId,rating,timestamp\n1,1,4.0,100\n1,3,5.0,200\n2,2,3.5,300\n")
    with caplog.at_level(logging.WARNING):
        catalog = prepare_movielens_latest(src, tmp_path / "cat")
    assert catalog.interactions.rows() == [(1, 1, 100, 4.0), (2, 2, 300, 3.5)]
    assert catalog.items["genres"].to_list() == ["Comedy, Drama", "Action"]
    assert _warnings(caplog) == [f"{src / 'ratings.csv'}: dropping 1 of 3 ratings of movies missing from "
                                 f"{src / 'movies.csv'} (the LlamaRec protocol)"]


def _tiny_ml100k(src: Path, poster: Path, tmdb_rows: str) -> Path:
    """A made-up three-movie MovieLens-100K folder (u.item, u.data, tmdb/items.csv, posters/)."""
    (src / "posters").mkdir(parents=True)
    (src / "tmdb").mkdir()
    flags = "|".join(["0"] * 18)
    (src / "u.item").write_text("".join(f"{i}|Movie {i} (1995)|01-Jan-1995||http://x|1|{flags}\n" for i in (1, 2, 3)),
                                encoding="latin1")
    (src / "u.data").write_text("1\t1\t5\t100\n1\t2\t3\t200\n2\t3\t4\t300\n")
    (src / "tmdb" / "items.csv").write_text("movie_id,overview,year\n" + tmdb_rows)
    for i in (1, 2, 3):
        shutil.copyfile(poster, src / "posters" / f"{i}.jpg")
    return src


def test_movielens_100k_warns_about_repeated_tmdb_rows(tmp_path: Path, poster: Path,
                                                       caplog: pytest.LogCaptureFixture) -> None:
    src = _tiny_ml100k(tmp_path / "ml", poster, "1,One,1995\n2,Two,1995\n2,Two,1995\n3,Three,1995\n3,Other,1995\n")
    with caplog.at_level(logging.WARNING):
        catalog = prepare_movielens_100k(src, tmp_path / "cat")
    assert catalog.items.select("item_id", "text").rows() == [(1, "One"), (2, "Two"), (3, "Three")]
    assert _warnings(caplog) == [f"{src / 'tmdb' / 'items.csv'}: dropping 2 rows that repeat a movie_id "
                                 "(with differing values; the first row of each is kept)"]


def test_movielens_100k_refuses_truncated_poster(tmp_path: Path, poster: Path) -> None:
    src = _tiny_ml100k(tmp_path / "ml", poster, "1,One,1995\n2,Two,1995\n3,Three,1995\n")
    data = poster.read_bytes()
    (src / "posters" / "2.jpg").write_bytes(data[: len(data) // 2])
    with pytest.raises(MediaError) as err:
        prepare_movielens_100k(src, tmp_path / "cat")
    assert re.fullmatch(re.escape(f"{src / 'u.item'} row 2: item_id 2, field 'image_path': "
                                  f"{src / 'posters' / '2.jpg'}: cannot decode image (") + r"image file is truncated.*\)",
                        str(err.value)), str(err.value)
    assert not (tmp_path / "cat").exists()


def test_prepare_generic_media_checked_per_row(tmp_path: Path, poster: Path) -> None:
    src = tmp_path / "src"
    (src / "img").mkdir(parents=True)
    shutil.copyfile(poster, src / "img" / "ok.jpg")
    (src / "img" / "bad.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg" * 10)
    items, interactions = _write(src, "item_id,title,cover\nx1,A,img/ok.jpg\nx2,B,\nx3,C,img/bad.jpg\n",
                                 "user_id,item_id,timestamp\n10,x1,100\n")
    with pytest.raises(MediaError, match=re.escape(f"{items} row 3: item_id 'x3', field 'image_path': "
                                                   f"{src / 'img' / 'bad.jpg'}: cannot decode image")):
        prepare_generic(items, interactions, tmp_path / "cat", mapping={"cover": "image_path"})
    assert not (tmp_path / "cat").exists()


def test_sequences_importer(tmp_path) -> None:
    from data.importers import prepare

    src = tmp_path / "user_sequence.txt"
    src.write_text("u1 a b c d e\nu2 b c a\n\nu3 e d\n")
    catalog = prepare("sequences", tmp_path / "cat", src=str(tmp_path))
    inter = catalog.interactions.sort(["user_id", "timestamp"])
    assert inter.filter(inter["user_id"] == "u2")["item_id"].to_list() == ["b", "c", "a"]  # line order = time
    assert catalog.items["title"].to_list() == catalog.items["item_id"].to_list()
    assert catalog.meta["tie_break"] == "input_order"
    src.write_text("u1 a b\nu1 c d\n")
    with pytest.raises(CatalogError, match="row 2: user 'u1' appears twice"):
        prepare("sequences", tmp_path / "cat2", src=str(src))
    src.write_text("u1\n")
    with pytest.raises(CatalogError, match="row 1: user 'u1' has no items"):
        prepare("sequences", tmp_path / "cat3", src=str(src))
