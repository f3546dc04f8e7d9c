"""The served evaluation: the training catalog's hash guards it, and it agrees with the training loop."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import polars as pl
import pytest

import cli
from configs import load_config
from data.catalog import load_catalog, write_catalog
from data.protocol import held_out, ranking_metrics, split_catalog
from data.rundir import RunDir
from errors import CatalogError
from index.build import build_index
from index.evaluate import evaluate
from rerank.pipeline import Pipeline
from train.loop import train

METRICS = [f"{m}@{k}" for m in ("recall", "ndcg", "mrr") for k in (5, 10, 20)]


def _media(catalog: Path) -> dict[str, Path]:
    items = load_catalog(catalog).items
    return {rel: catalog / rel for col in ("image_path", "audio_path") for rel in items[col].drop_nulls().to_list()}


def _reprepare(catalog: Path, source: Path) -> None:
    """Write a catalog with other data (one interaction fewer) in ``catalog``'s place, as `prepare` would."""
    src = load_catalog(source)
    write_catalog(catalog, src.items, src.interactions.slice(1), _media(source), meta=src.meta, overwrite=True)


@pytest.fixture
def own_catalog_run(tiny_run: Path, tiny_catalog: Path, tmp_path: Path) -> tuple[Path, Path]:
    """Copies of the tiny catalog and run, the run pointing at the copied catalog (same content, same hash)."""
    catalog, run = tmp_path / "catalog", tmp_path / "run"
    shutil.copytree(tiny_catalog, catalog)
    shutil.copytree(tiny_run, run)
    RunDir(run).write_catalog_ref(load_catalog(catalog))
    return catalog, run


def _error_line(capsys: pytest.CaptureFixture, command: str) -> str:
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith(f"towerrec {command}: error: ")
    return lines[0]


def test_evaluate_refuses_a_catalog_changed_in_place(own_catalog_run, tiny_catalog: Path,
                                                     capsys: pytest.CaptureFixture) -> None:
    catalog, run = own_catalog_run
    assert evaluate(run, users=3, rerank=False, progress=False)["users"] == 3  # fine before the change
    _reprepare(catalog, tiny_catalog)
    with pytest.raises(CatalogError, match="catalog content changed since run .* was trained on it"):
        evaluate(run, rerank=False, progress=False)
    assert cli.main(["evaluate", "--run", str(run), "--rerank", "off", "--quiet"]) == 2
    line = _error_line(capsys, "evaluate")
    assert f"error: {catalog.resolve()}: catalog content changed since run {run} was trained on it" in line
    assert "re-prepared or edited" in line
    # Pointing --catalog at the changed catalog is refused just the same.
    assert cli.main(["evaluate", "--run", str(run), "--catalog", str(catalog), "--rerank", "off", "--quiet"]) == 2
    assert "catalog content changed" in _error_line(capsys, "evaluate")
    # build-index from the run's catalog refuses it too (without an index version, that is the one it indexes;
    # with one, it indexes the catalog the live version recorded).
    shutil.rmtree(run / "index")
    with pytest.raises(CatalogError, match="catalog content changed"):
        build_index(run, device="cpu", progress=False)


def test_evaluate_finds_a_moved_catalog_with_catalog_flag(own_catalog_run, tmp_path: Path,
                                                         capsys: pytest.CaptureFixture) -> None:
    catalog, run = own_catalog_run
    argv = ["evaluate", "--run", str(run), "--rerank", "off", "--json", "--quiet"]
    assert cli.main(argv) == 0
    before = json.loads(capsys.readouterr().out)
    moved = tmp_path / "moved" / "catalog"
    moved.parent.mkdir()
    shutil.move(catalog, moved)

    assert cli.main(argv) == 2
    line = _error_line(capsys, "evaluate")
    assert f"{catalog.resolve()}: the catalog run {run} was trained on is not there (moved or deleted?)" in line
    assert "--catalog" in line

    assert cli.main([*argv, "--catalog", str(moved)]) == 0
    after = json.loads(capsys.readouterr().out)
    assert after["users"] == before["users"] == 60
    assert {k: after["retrieval"][k] for k in METRICS} == {k: before["retrieval"][k] for k in METRICS}


# --- re-watches: a test target the user also saw earlier -------------------------------------------------


@pytest.fixture(scope="module")
def rewatch_run(tiny_catalog: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny run on a catalog where every other user's test item is a re-watch of an earlier item."""
    src = load_catalog(tiny_catalog)
    inter = src.interactions
    split = split_catalog(load_config("tiny"), src)  # re-watch an item that survives the k-core filter
    users = split.user_ids[::2]
    last = inter.group_by("user_id").agg(pl.col("timestamp").max())
    extra = pl.DataFrame({"user_id": users, "item_id": [split.item_ids[split.sequences[u][2]]
                                                        for u in range(0, split.num_users, 2)]},
                         schema={"user_id": inter["user_id"].dtype, "item_id": inter["item_id"].dtype})
    extra = extra.join(last, on="user_id").with_columns(pl.col("timestamp") + 1)
    if "rating" in inter.columns:
        extra = extra.with_columns(pl.lit(5.0).alias("rating"))
    inter = pl.concat([inter, extra], how="diagonal_relaxed")
    root = tmp_path_factory.mktemp("rewatch")
    write_catalog(root / "catalog", src.items, inter, _media(tiny_catalog), meta=src.meta)
    run = root / "run"
    train(load_config("tiny", ["train.epochs=1"]), root / "catalog", run, progress=False)
    build_index(run, device="cpu", progress=False)
    return run


def test_rewatched_targets_served_as_in_training(rewatch_run: Path) -> None:
    rec = Pipeline.load(rewatch_run, device="cpu")
    split = split_catalog(rec.config, RunDir(rewatch_run).load_catalog())
    held = [held_out(split, u, "test") for u in range(split.num_users)]
    rewatched = [u for u, (target, history, _) in enumerate(held) if target in set(history.tolist())]
    assert len(rewatched) == 30  # the catalog does what it says

    out = evaluate(rewatch_run, rerank=False, progress=False, recommender=rec)
    test = RunDir(rewatch_run).read_metrics()["test"]
    assert out["users"] == test["users"] == 60
    for key in METRICS:
        assert out["retrieval"][key] == pytest.approx(test[key], abs=1e-4), key

    # The check has teeth: dropping every seen item, re-watched targets included, scores differently.
    histories = [[split.item_ids[j] for j in h] for _, h, _ in held]
    lists = rec.recommend_batch(histories=histories, k=20, rerank=False, allow=split.item_ids)
    ranks = []
    for (target, _, _), recs in zip(held, lists):
        ids = [r.item_id for r in recs]
        ranks.append(ids.index(split.item_ids[target]) if split.item_ids[target] in ids else 20)
    dropped = ranking_metrics(ranks, (20,))
    assert dropped["recall@20"] < out["retrieval"]["recall@20"] - 1e-3
