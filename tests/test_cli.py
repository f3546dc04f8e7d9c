"""The command line: exit codes, one-line errors, help, and query/evaluate on a tiny trained run."""

from __future__ import annotations

import json
from pathlib import Path

import polars as pl
import pytest

import cli
from index.recommender import Recommender

SUBCOMMANDS = ("prepare", "train", "build-index", "query", "evaluate")


def _csvs(folder: Path, items: str, interactions: str) -> tuple[Path, Path]:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "items.csv").write_text(items)
    (folder / "interactions.csv").write_text(interactions)
    return folder / "items.csv", folder / "interactions.csv"


def _error_line(capsys: pytest.CaptureFixture, command: str) -> str:
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith(f"towerrec {command}: error: ")
    assert "Traceback" not in err
    return lines[0]


def test_prepare_generic(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    items, interactions = _csvs(tmp_path / "src", "movieId,name\n1,Alpha\n2,Beta\n3,Gamma\n",
                                "user_id,movieId,timestamp\nu1,1,100\nu1,2,200\nu2,3,2024-01-02\n")
    out = tmp_path / "catalog"
    code = cli.main(["prepare", "--items", str(items), "--interactions", str(interactions), "--out", str(out),
                     "--map", "movieId=item_id", "--map", "name=title"])
    assert code == 0
    assert capsys.readouterr().out.strip() == f"catalog {out}: 3 items, 3 interactions, 2 users"
    assert pl.read_parquet(out / "items.parquet")["title"].to_list() == ["Alpha", "Beta", "Gamma"]
    assert pl.read_parquet(out / "interactions.parquet")["timestamp"].to_list() == [100, 200, 1704153600]


def test_prepare_missing_column_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    items, interactions = _csvs(tmp_path / "src", "item_id,name\n1,Alpha\n",
                                "user_id,item_id,timestamp\n10,1,100\n")
    code = cli.main(["prepare", "--items", str(items), "--interactions", str(interactions),
                     "--out", str(tmp_path / "catalog")])
    assert code == 2
    line = _error_line(capsys, "prepare")
    assert str(items) in line and "missing column 'title'" in line
    assert not (tmp_path / "catalog").exists()


def test_prepare_generic_needs_both_tables(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert cli.main(["prepare", "--items", str(tmp_path / "x.csv"), "--out", str(tmp_path / "c")]) == 2
    assert "--format generic needs --interactions" in _error_line(capsys, "prepare")


def test_train_unknown_override(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    code = cli.main(["train", "--config", "tiny", "--set", "train.bogus=1", "--catalog", str(tmp_path / "cat"),
                     "--run", str(tmp_path / "run")])
    assert code == 2
    assert "unknown key(s) ['bogus']" in _error_line(capsys, "train")
    assert not (tmp_path / "run").exists()


def test_train_badly_typed_override(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    code = cli.main(["train", "--config", "tiny", "--set", "train.lr=abc", "--catalog", str(tmp_path / "cat"),
                     "--run", str(tmp_path / "run")])
    assert code == 2
    assert "train.lr: expected float, got str 'abc'" in _error_line(capsys, "train")


@pytest.mark.parametrize("command", SUBCOMMANDS)
def test_subcommand_help(command: str, capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as exit_info:
        cli.main([command, "--help"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.startswith(f"usage: towerrec {command}")


def test_no_subcommand_is_a_usage_error(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as exit_info:
        cli.main([])
    assert exit_info.value.code == 2
    assert "usage: towerrec" in capsys.readouterr().err


def test_query_unknown_user(tiny_run: Path, capsys: pytest.CaptureFixture) -> None:
    code = cli.main(["query", "--run", str(tiny_run), "--user", "no-such-user", "--device", "cpu"])
    assert code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    errors = [line for line in err.splitlines() if line.startswith("towerrec query: error: ")]
    assert errors == ["towerrec query: error: unknown user_id 'no-such-user'; pass history=[item ids] for a new user"]
    assert err.strip().splitlines()[-1] == errors[0]


def test_query_unknown_user_stderr_is_one_line(tiny_run: Path, capsys: pytest.CaptureFixture) -> None:
    assert cli.main(["query", "--run", str(tiny_run), "--user", "no-such-user", "--device", "cpu"]) == 2
    _error_line(capsys, "query")


def test_query_missing_run(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert cli.main(["query", "--run", str(tmp_path / "nope"), "--user", "1"]) == 2
    assert "run directory not found" in _error_line(capsys, "query")


def test_query_json(tiny_run: Path, capsys: pytest.CaptureFixture) -> None:
    rec = Recommender.load(tiny_run, device="cpu")
    user = sorted(rec.histories)[0]
    code = cli.main(["query", "--run", str(tiny_run), "--user", str(user), "-k", "5", "--rerank", "off",
                     "--device", "cpu", "--json"])
    assert code == 0
    got = json.loads(capsys.readouterr().out)
    want = rec.recommend(user_id=user, k=5, rerank=False)
    assert [r["item_id"] for r in got] == [r.item_id for r in want]
    assert [r["title"] for r in got] == [r.title for r in want]
    assert [r["score"] for r in got] == pytest.approx([r.score for r in want], abs=1e-5)
    assert all(r["rerank_score"] is None for r in got)


def test_query_text_for_new_user(tiny_run: Path, capsys: pytest.CaptureFixture) -> None:
    code = cli.main(["query", "--run", str(tiny_run), "--history", "1,50,100", "-k", "3", "--rerank", "on",
                     "--device", "cpu"])
    assert code == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "history (3 items, most recent last):"
    assert out[1:4] == ["  1: Toy Story (1995)", "  50: Star Wars (1977)", "  100: Fargo (1996)"]
    assert out[4] == "top-3:"
    assert len(out) == 8 and all("llm " in line for line in out[5:])


def test_evaluate_json(tiny_run: Path, capsys: pytest.CaptureFixture) -> None:
    code = cli.main(["evaluate", "--run", str(tiny_run), "--users", "5", "--json", "--quiet"])
    assert code == 0
    out = capsys.readouterr().out
    assert len(out.strip().splitlines()) == 1
    result = json.loads(out)
    assert result["users"] == 5
    assert result["protocol"] == "5-core leave-one-out, full ranking"
    for mode in ("retrieval", "reranked"):
        assert set(result[mode]) == {f"{m}@{k}" for m in ("recall", "ndcg", "mrr") for k in (5, 10, 20)} | {"seconds"}
        assert all(0.0 <= v <= 1.0 for key, v in result[mode].items() if key != "seconds")
