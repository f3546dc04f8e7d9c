"""Timestamps in any unix scale or as ISO-8601 text, read as the catalog stores them (data/columns.py)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import polars as pl
import pytest

from data.catalog import (
    CatalogError,
    validate_interactions,
    validate_items,
)
from data.importers import prepare_generic

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
