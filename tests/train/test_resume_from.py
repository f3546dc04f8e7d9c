"""Periodic re-fine-tuning: `train --resume-from RUN` on a newer catalog, then `reindex` (the README's cycle)."""

from __future__ import annotations

import json
from pathlib import Path

import polars as pl
import pytest
import torch

import cli
from data.catalog import load_catalog, write_catalog
from data.rundir import RunDir
from errors import CheckpointError
from towers.factory import build_towers, load_towers
from train.loop import init_from_run, load_training_data

NEW_IDS = [900001, 900002]


@pytest.fixture(scope="module")
def newer_catalog(tiny_catalog: Path, tmp_path_factory) -> Path:
    """The tiny catalog a month later: two new films rated by six users each, and one film delisted."""
    cat = load_catalog(tiny_catalog)
    items, events = cat.items, cat.interactions
    delisted = int(events.group_by("item_id").len().sort(["len", "item_id"], descending=[False, False])["item_id"][0])
    new = pl.DataFrame({"item_id": NEW_IDS, "title": ["Brand New Film (2026)", "Another Premiere (2026)"],
                        "text": ["A heist in a lighthouse.", "Two robots open a bakery."],
                        "image_path": [None, None], "audio_path": [None, None], "year": [2026, 2026]},
                       schema=items.schema)
    items = pl.concat([items.filter(pl.col("item_id") != delisted), new])
    users = events["user_id"].unique().sort()[:6].to_list()
    last = int(events["timestamp"].max())
    rated = pl.DataFrame([(u, i, last + 10 * k + j, 4.0) for k, u in enumerate(users) for j, i in enumerate(NEW_IDS)],
                         schema=events.schema, orient="row")
    events = pl.concat([events.filter(pl.col("item_id") != delisted), rated])
    out = tmp_path_factory.mktemp("newer") / "catalog"
    media = {rel: tiny_catalog / rel for col in ("image_path", "audio_path") for rel in items[col].drop_nulls().unique()}
    write_catalog(out, items, events, media)
    return out


def test_init_from_run_remaps_id_rows_by_item_id(tiny_run: Path, newer_catalog: Path) -> None:
    config = RunDir(tiny_run).read_config()
    data = load_training_data(config, newer_catalog)
    assert set(NEW_IDS) <= set(data.split_items.ids)  # the new films are in the new split (5-core)
    model = build_towers(config, num_ids=data.split.num_items)
    fresh = model.item.ids.weight.detach().clone()
    counts = init_from_run(model, tiny_run, data.split_items)
    old = load_towers(tiny_run)
    old_table = RunDir(tiny_run).read_id_table()
    kept = [i for i in data.split_items.ids if i in old_table]
    assert counts == {"kept": len(kept), "new": data.split.num_items - len(kept)} and counts["new"] >= 2
    table = model.item.ids.weight.detach()
    for item_id in kept:
        torch.testing.assert_close(table[data.split_items.row(item_id)], old.item.ids.weight[old_table.row(item_id)],
                                   rtol=0, atol=0)
    for item_id in NEW_IDS:  # new items keep their fresh initialisation, to be learned now
        row = data.split_items.row(item_id)
        torch.testing.assert_close(table[row], fresh[row], rtol=0, atol=0)
    for name, tensor in old.state_dict().items():  # every other trained tensor is copied as it is
        if name.startswith(("item.fusion.", "user.head.")) or name == "logit_scale":
            torch.testing.assert_close(model.state_dict()[name], tensor, rtol=0, atol=0, msg=name)


def test_init_from_run_refuses_other_towers(tiny_run: Path, newer_catalog: Path) -> None:
    from configs import config_from_dict

    config = config_from_dict(RunDir(tiny_run).read_config().to_dict(), ["dim=16"])
    data = load_training_data(config, newer_catalog)
    with pytest.raises(CheckpointError, match=r"--resume-from .*: (tensor|id table) .* this config"):
        init_from_run(build_towers(config, num_ids=data.split.num_items), tiny_run, data.split_items)


@pytest.mark.slow
def test_refinetune_then_reindex_cycle(tiny_run: Path, newer_catalog: Path, tmp_path: Path, capsys) -> None:
    """The README's three commands (after `prepare`): train --resume-from, reindex, query."""
    run = tmp_path / "run-2"
    assert cli.main(["train", "--resume-from", str(tiny_run), "--catalog", str(newer_catalog), "--run", str(run),
                     "--set", "train.epochs=1", "--quiet", "--device", "cpu"]) == 0
    capsys.readouterr()
    before, after = RunDir(tiny_run).read_config().to_dict(), RunDir(run).read_config().to_dict()
    assert after["name"] == before["name"] == "tiny" and after["train"]["epochs"] == 1
    assert cli.main(["reindex", "--run", str(run), "--json", "--quiet", "--device", "cpu"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["mode"] == "full" and out["rows"] == out["searchable"] == 151 and out["retired"] == 0
    histories = RunDir(run).read_histories()
    user = next(u for u, h in histories.items() if NEW_IDS[0] in h)
    assert cli.main(["query", "--run", str(run), "--user", str(user), "-k", "5", "--rerank", "off", "--json",
                     "--device", "cpu"]) == 0
    recs = json.loads(capsys.readouterr().out)["items"]
    assert len(recs) == 5 and not {r["item_id"] for r in recs} & set(histories[user])
