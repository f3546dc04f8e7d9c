"""Transfer to another catalog: `train --init-from RUN` (every weight but the id vectors) and `--zero-shot`
(no training: the transferred towers serve the new catalog from content alone)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import torch

import cli
from configs import load_config
from data.catalog import load_catalog, write_catalog
from data.rundir import RunDir
from errors import ConfigError
from towers.factory import load_towers
from train.loop import train

ITEMS = ["user.input=items", "item.image.enabled=false", "item.audio.enabled=false"]


@pytest.fixture(scope="module")
def source_run(tiny_catalog: Path, tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("source") / "run"
    train(load_config("tiny", [*ITEMS, "train.epochs=2"]), tiny_catalog, run, progress=False)
    return run


@pytest.fixture(scope="module")
def other_catalog(tiny_catalog: Path, tmp_path_factory) -> Path:
    """Another catalog of the same films whose ids are shuffled: id k names another film than in the source,
    so carrying an id vector over by id would give a film another film's vector."""
    cat = load_catalog(tiny_catalog)
    ids = cat.items["item_id"].to_list()
    shuffled = dict(zip(ids, np.random.default_rng(0).permutation(ids).tolist(), strict=True))
    items = cat.items.with_columns(pl.col("item_id").replace_strict(shuffled))
    events = cat.interactions.with_columns(pl.col("item_id").replace_strict(shuffled))
    media = {rel: tiny_catalog / rel for col in ("image_path", "audio_path") for rel in items[col].drop_nulls().unique()}
    out = tmp_path_factory.mktemp("other") / "catalog"
    write_catalog(out, items, events, media)
    return out


def _shared(a: dict, b: dict) -> list[str]:
    return [k for k in a if k in b and not k.startswith(("item.ids", "user.table"))]


def test_zero_shot_serves_another_catalog_from_content_alone(source_run: Path, other_catalog: Path,
                                                             tmp_path: Path) -> None:
    from index.build import build_index
    from index.evaluate import evaluate

    config = load_config("tiny", [*ITEMS, "train.epochs=2", "item.id_embedding=false"])  # the source's, no ids
    run = tmp_path / "zero"
    result = train(config, other_catalog, run, progress=False, init_from=source_run, zero_shot=True)
    assert result.history == [] and result.transfer == {"from": str(RunDir(source_run).path), "zero_shot": True}
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["transfer"]["zero_shot"] is True and metrics["test"]["ndcg@10"] == result.test["ndcg@10"]
    src, dst = load_towers(source_run).state_dict(), load_towers(run).state_dict()
    assert "item.ids.weight" not in dst and not any(".id." in k for k in dst)  # content alone
    for k in _shared(src, dst):  # every other weight is the source's, untouched
        torch.testing.assert_close(dst[k], src[k], msg=k)
    build_index(run, progress=False)
    served = evaluate(run, rerank=False, progress=False)["retrieval"]
    assert served["ndcg@10"] == pytest.approx(result.test["ndcg@10"], abs=2e-4)
    assert result.test["ndcg@10"] > 0  # the transferred content towers rank something right


def test_init_from_carries_no_id_vector_across_catalogs(source_run: Path, other_catalog: Path,
                                                        tmp_path: Path) -> None:
    from towers.factory import build_towers
    from train.loop import init_from_run, load_training_data

    config = RunDir(source_run).read_config()
    data = load_training_data(config, other_catalog)
    fresh = build_towers(config, num_ids=data.split.num_train_items)
    before = fresh.state_dict()["item.ids.weight"].clone()
    counts = init_from_run(fresh, source_run, data.id_items, transfer=True)
    assert counts == {"kept": 0, "new": len(data.id_items)}
    torch.testing.assert_close(fresh.state_dict()["item.ids.weight"], before)  # every row starts fresh
    src = load_towers(source_run).state_dict()
    for k in _shared(src, fresh.state_dict()):
        torch.testing.assert_close(fresh.state_dict()[k], src[k], msg=k)
    # Through the CLI: --init-from trains (the source run's config), and says where it came from.
    rc = cli.main(["train", "--catalog", str(other_catalog), "--run", str(tmp_path / "tuned"), "--init-from",
                   str(source_run), "--set", "train.epochs=1", "--json", "--quiet"])
    assert rc == 0
    metrics = json.loads((tmp_path / "tuned" / "metrics.json").read_text())
    assert metrics["transfer"] == {"from": str(RunDir(source_run).path), "zero_shot": False}
    assert len(metrics["history"]) == 1


def test_transfer_refusals(source_run: Path, other_catalog: Path, tmp_path: Path, capsys) -> None:
    config = load_config("tiny", [*ITEMS])
    with pytest.raises(ConfigError, match="item.id_embedding=false"):
        train(config, other_catalog, tmp_path / "a", progress=False, init_from=source_run, zero_shot=True)
    with pytest.raises(ConfigError, match="exclude each other"):
        train(config, other_catalog, tmp_path / "b", progress=False, init_from=source_run, resume_from=source_run)
    assert cli.main(["train", "--catalog", str(other_catalog), "--run", str(tmp_path / "c"), "--zero-shot"]) == 2
    assert "--init-from" in capsys.readouterr().err
