"""Media in a catalog: decoded when it is written, confined to the catalog folder when it is loaded (data/catalog.py)."""

from __future__ import annotations

import json
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
    write_catalog,
)
from data.importers import prepare_generic
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
