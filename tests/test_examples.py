"""The README's own-data example (examples/items.csv, examples/events.csv) goes through the whole path."""

from __future__ import annotations

from pathlib import Path

import cli
from configs import load_config
from data.catalog import load_catalog
from data.protocol import leave_one_out

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
MAPS = ["episode_id=item_id", "name=title", "description=text", "listener=user_id", "played_at=timestamp",
        "stars=rating", "cover=image_path", "clip=audio_path"]


def test_example_catalog_prepares_trains_and_serves(tmp_path: Path, capsys) -> None:
    from index.build import build_index
    from index.recommender import Recommender
    from train.loop import train

    args = ["prepare", "--items", str(EXAMPLES / "items.csv"), "--interactions", str(EXAMPLES / "events.csv"),
            "--out", str(tmp_path / "catalog")]
    for m in MAPS:
        args += ["--map", m]
    assert cli.main(args) == 0
    catalog = load_catalog(tmp_path / "catalog")
    assert catalog.items.height == 12 and catalog.interactions.height == 80
    assert catalog.items.filter(catalog.items["image_path"].is_not_null()).height == 3
    assert catalog.items.filter(catalog.items["item_id"] == "ep-011")["audio_path"].item().endswith(".wav")
    assert "host" in catalog.items.columns  # extra columns are kept
    assert catalog.interactions["timestamp"].min() > 1.7e9  # ISO-8601 read as unix seconds
    split = leave_one_out(catalog.interactions)  # the example passes the default 5-core filter
    assert split.num_users == 10 and split.num_items == 12

    run = tmp_path / "run"
    train(load_config("tiny", ["train.epochs=1"]), tmp_path / "catalog", run, progress=False)
    build_index(run, progress=False)
    recs = Recommender.load(run).recommend(user_id="listener-01", k=3, rerank=False)
    assert len(recs) == 3 and all(r.item_id.startswith("ep-") for r in recs)
