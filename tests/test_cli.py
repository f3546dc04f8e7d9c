"""The command line: exit codes, one-line errors, help, and query/evaluate on a tiny trained run."""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import polars as pl
import pytest
import torch

import cli
from data.catalog import load_catalog
from index.store import live_version
from rerank.pipeline import Pipeline

SUBCOMMANDS = ("prepare", "train", "build-index", "reindex", "query", "train-rerank", "train-reasons", "evaluate",
               "serve")


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


def test_top_level_help_names_every_subcommand(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    description = out.split("\n\n")[1]  # the paragraph under the usage lines
    for command in SUBCOMMANDS:
        assert command in description, command


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
    rec = Pipeline.load(tiny_run, device="cpu")
    user = sorted(rec.histories)[0]
    code = cli.main(["query", "--run", str(tiny_run), "--user", str(user), "-k", "5", "--rerank", "off",
                     "--device", "cpu", "--json"])
    assert code == 0
    out = json.loads(capsys.readouterr().out)
    got = out["items"]
    want = rec.recommend(user_id=user, k=5, rerank=False)
    assert out["version"] == want.version == rec.version.name and out["latency_ms"] > 0
    assert [r["item_id"] for r in got] == [r.item_id for r in want]
    assert [r["title"] for r in got] == [r.title for r in want]
    assert [r["score"] for r in got] == pytest.approx([r.score for r in want], abs=1e-5)
    assert all(r["rerank_score"] is None for r in got)


def test_query_text_for_new_user(tiny_run: Path, tiny_catalog: Path, capsys: pytest.CaptureFixture) -> None:
    titles = dict(load_catalog(tiny_catalog).items.select("item_id", "title").iter_rows())
    code = cli.main(["query", "--run", str(tiny_run), "--history", "1,50,100", "-k", "3", "--rerank", "on",
                     "--device", "cpu"])
    assert code == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "history (3 items, most recent last):"
    assert out[1:4] == [f"  {i}: {titles[i]}" for i in (1, 50, 100)]
    assert out[4] == "top-3:"
    assert len(out) == 9 and all("llm " in line for line in out[5:8])
    assert re.fullmatch(r"index version v\S+, query \d+\.\d ms", out[8])


def test_evaluate_json(tiny_run: Path, capsys: pytest.CaptureFixture) -> None:
    code = cli.main(["evaluate", "--run", str(tiny_run), "--users", "5", "--json", "--quiet"])
    assert code == 0
    out = capsys.readouterr().out
    assert len(out.strip().splitlines()) == 1
    result = json.loads(out)
    assert result["users"] == 5
    assert result["protocol"] == "warm"
    for mode in ("retrieval", "reranked"):
        assert set(result[mode]) == {f"{m}@{k}" for m in ("recall", "ndcg", "mrr") for k in (5, 10, 20)} | {"seconds"}
        assert all(0.0 <= v <= 1.0 for key, v in result[mode].items() if key != "seconds")


# --- one line and exit code 2 for every kind of bad input -------------------------------------------------


def _snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` (relative path -> bytes)."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture
def run_copy(tiny_run: Path, tmp_path: Path) -> Path:
    """A private copy of the tiny run (the session's own must never change)."""
    dst = tmp_path / "run"
    shutil.copytree(tiny_run, dst)
    return dst


def _run_cli(argv: list[str]) -> int:
    """``cli.main`` with logging set up as it is outside pytest (whose handlers on the root logger make the CLI's
    ``basicConfig`` a no-op), so whatever it logs reaches the captured stderr; pytest's handlers come back after."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    root.handlers.clear()
    try:
        return cli.main(argv)
    finally:
        for handler in root.handlers:
            handler.close()
        root.handlers[:] = handlers
        root.setLevel(level)


def _no_cuda() -> None:
    if torch.cuda.is_available():
        pytest.skip("CUDA is available here: --device cuda is valid")


@pytest.mark.parametrize("flag, device, message", [
    (["--device", "cuda"], "cuda", "device 'cuda' requested but CUDA is not available on this machine"),
    (["--device", "bogus"], "bogus", "unknown device 'bogus'; use auto, cpu, cuda"),
    (["--set", "train.device=cuda"], "cuda", "device 'cuda' requested but CUDA is not available on this machine"),
], ids=["device-cuda", "device-bogus", "set-cuda"])
def test_train_bad_device_is_one_line(flag: list[str], device: str, message: str, tiny_catalog: Path,
                                      tmp_path: Path, capfd: pytest.CaptureFixture) -> None:
    if device == "cuda":
        _no_cuda()
    out = tmp_path / "out"
    code = _run_cli(["train", "--config", "tiny", "--catalog", str(tiny_catalog), "--run", str(out / "run"),
                     *flag, "--quiet"])
    assert code == 2
    assert _error_line(capfd, "train").startswith(f"towerrec train: error: {message}")
    assert not out.exists() or not list(out.iterdir())  # no run, no staging folder


@pytest.mark.parametrize("command", ["query", "build-index"])
@pytest.mark.parametrize("device, message", [
    ("cuda", "device 'cuda' requested but CUDA is not available on this machine"),
    ("bogus", "unknown device 'bogus'; use auto, cpu, cuda"),
], ids=["cuda", "bogus"])
def test_serving_bad_device_is_one_line(command: str, device: str, message: str, tiny_run: Path,
                                        capfd: pytest.CaptureFixture) -> None:
    if device == "cuda":
        _no_cuda()
    before = _snapshot(tiny_run)
    args = [command, "--run", str(tiny_run), "--device", device]
    if command == "query":
        args += ["--history", "1,50"]
    assert _run_cli(args) == 2
    assert _error_line(capfd, command).startswith(f"towerrec {command}: error: {message}")
    assert _snapshot(tiny_run) == before


@pytest.mark.parametrize("factory, message", [
    ("Bogus123", "bad FAISS factory string 'Bogus123' for dimension 32"),
    ("IVF1024,Flat", "FAISS factory 'IVF1024,Flat' needs at least 1024 items to train, the catalog has 150"),
], ids=["bogus", "ivf1024"])
def test_build_index_bad_factory_is_one_line(factory: str, message: str, run_copy: Path,
                                             capfd: pytest.CaptureFixture) -> None:
    before = _snapshot(run_copy)
    # No --quiet: the factory is checked before the embedding (and its progress bar) starts.
    code = _run_cli(["build-index", "--run", str(run_copy), "--factory", factory, "--device", "cpu"])
    assert code == 2
    assert message in _error_line(capfd, "build-index")
    assert _snapshot(run_copy) == before  # no new version, LIVE unchanged
    assert not [p for p in (run_copy / "index").iterdir() if p.name.startswith(".")]  # no temporary folder


def test_query_truncated_weights_is_one_line(run_copy: Path, capfd: pytest.CaptureFixture) -> None:
    weights = run_copy / "towers.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    code = _run_cli(["query", "--run", str(run_copy), "--history", "1,50", "--device", "cpu"])
    assert code == 2
    line = _error_line(capfd, "query")
    assert f"{weights}: unreadable or truncated weights" in line


def test_query_error_after_loading_the_towers_is_one_line(tiny_run: Path, capfd: pytest.CaptureFixture) -> None:
    """Building the towers makes third-party libraries warn (open_clip: no pretrained weights); not on stderr."""
    assert _run_cli(["query", "--run", str(tiny_run), "--user", "no-such-user", "--device", "cpu"]) == 2
    assert _error_line(capfd, "query") == ("towerrec query: error: unknown user_id 'no-such-user'; "
                                           "pass history=[item ids] for a new user")


def test_verbose_shows_third_party_warnings(tiny_run: Path, capfd: pytest.CaptureFixture) -> None:
    assert _run_cli(["query", "-v", "--run", str(tiny_run), "--user", "no-such-user", "--device", "cpu"]) == 2
    err = capfd.readouterr().err
    assert "INFO" in err  # -v shows the libraries' and our own progress logs
    assert "No pretrained weights loaded" not in err  # a random init that was asked for is not worth a warning
    assert err.strip().splitlines()[-1].startswith("towerrec query: error: unknown user_id")


def test_query_empty_history_is_one_line(tiny_run: Path, capfd: pytest.CaptureFixture) -> None:
    for history in ("", " , ,"):
        assert _run_cli(["query", "--run", str(tiny_run), "--history", history, "--device", "cpu"]) == 2
        line = _error_line(capfd, "query")
        assert "--history is empty" in line
        assert "exactly one of" not in line


def test_evaluate_negative_users_names_the_flag(tiny_run: Path, capfd: pytest.CaptureFixture) -> None:
    assert _run_cli(["evaluate", "--run", str(tiny_run), "--users", "-5", "--quiet"]) == 2
    line = _error_line(capfd, "evaluate")
    assert "--users" in line and "-5" in line


@pytest.mark.parametrize("argv", [
    ["query", "-v", "--run", "r", "--user", "1"],
    ["query", "--run", "r", "--user", "1", "--verbose"],
    ["-v", "query", "--run", "r", "--user", "1"],
])
def test_verbose_before_or_after_the_subcommand(argv: list[str]) -> None:
    assert cli.build_parser().parse_args(argv).verbose is True
    assert getattr(cli.build_parser().parse_args(["query", "--run", "r", "--user", "1"]), "verbose", False) is False


def test_verbose_after_subcommand_runs(tiny_run: Path, capsys: pytest.CaptureFixture) -> None:
    code = cli.main(["query", "-v", "--run", str(tiny_run), "--history", "1,50", "-k", "2", "--rerank", "off",
                     "--device", "cpu", "--json"])
    assert code == 0
    assert len(json.loads(capsys.readouterr().out)["items"]) == 2


# --- query text output ------------------------------------------------------------------------------------


def test_query_text_shows_last_ten_history_items(tiny_run: Path, capsys: pytest.CaptureFixture) -> None:
    rec = Pipeline.load(tiny_run, device="cpu")
    user = next(u for u in sorted(rec.histories) if len(rec.histories[u]) > 12)
    history = rec.history_of(user)
    titles = dict(zip(rec.item_ids, rec.titles))
    code = cli.main(["query", "--run", str(tiny_run), "--user", str(user), "-k", "3", "--rerank", "off",
                     "--device", "cpu"])
    assert code == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == f"history (last 10 of {len(history)} items, most recent last):"
    assert out[1:11] == [f"  {i}: {titles[i]}" for i in history[-10:]]
    assert out[11] == "top-3:"
    assert len(out) == 16 and out[15].startswith(f"index version {rec.version.name}, query ")


def test_query_filters(tiny_run: Path, capsys: pytest.CaptureFixture) -> None:
    """--allow, --deny and --where reach the query; --k above 1000 and an unknown column are one-line errors."""
    rec = Pipeline.load(tiny_run, device="cpu")
    user = sorted(rec.histories)[0]
    base = ["query", "--run", str(tiny_run), "--user", str(user), "--rerank", "off", "--device", "cpu", "--json"]
    want = rec.recommend(user_id=user, k=4, rerank=False, allow=[1, 50, 100, 181, 258, 7], deny=[50],
                         where="title LIKE '%(199%'")
    assert cli.main(base + ["--k", "4", "--allow", "1,50,100,181,258,7", "--deny", "50",
                            "--where", "title LIKE '%(199%'"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert [r["item_id"] for r in out["items"]] == [r.item_id for r in want] and want
    assert all(r["title"][-6:-2] == "(199" for r in out["items"]) and 50 not in [r["item_id"] for r in out["items"]]
    assert cli.main(base + ["--k", "1001"]) == 2
    assert _error_line(capsys, "query") == "towerrec query: error: --k must be from 1 to 1000, got 1001"
    assert cli.main(base + ["--where", "decade > 1990"]) == 2
    assert "where: unknown column 'decade'" in _error_line(capsys, "query")


# --- train: refusing, overwriting and interrupting ---------------------------------------------------------


TINY_TRAIN = ["--config", "tiny", "--set", "train.epochs=1", "--quiet"]


def test_train_refuses_existing_run(run_copy: Path, tiny_catalog: Path, capfd: pytest.CaptureFixture) -> None:
    before = _snapshot(run_copy)
    code = _run_cli(["train", *TINY_TRAIN, "--catalog", str(tiny_catalog), "--run", str(run_copy)])
    assert code == 2
    line = _error_line(capfd, "train")
    assert f"{run_copy} already holds a towerrec run" in line and "--overwrite" in line
    assert _snapshot(run_copy) == before
    assert sorted(p.name for p in run_copy.parent.iterdir()) == ["run"]  # no staging folder left


def test_train_overwrite_replaces_run(run_copy: Path, tiny_catalog: Path, capsys: pytest.CaptureFixture) -> None:
    (run_copy / "notes.txt").write_text("from the old run")
    old_metrics = (run_copy / "metrics.json").read_text()
    code = cli.main(["train", *TINY_TRAIN, "--set", "train.seed=1", "--catalog", str(tiny_catalog),
                     "--run", str(run_copy), "--overwrite", "--json"])
    assert code == 0
    assert json.loads(capsys.readouterr().out)["run"] == str(run_copy)
    names = sorted(p.name for p in run_copy.iterdir())
    assert "notes.txt" not in names and "index" not in names  # the old run went whole, old index included
    assert {"config.json", "towers.safetensors", "metrics.json", "histories.parquet"} <= set(names)
    assert (run_copy / "metrics.json").read_text() != old_metrics
    assert json.loads((run_copy / "config.json").read_text())["train"]["seed"] == 1
    assert sorted(p.name for p in run_copy.parent.iterdir()) == ["run"]  # no staging or old folder left


def _interrupt(*args, **kwargs):
    raise KeyboardInterrupt


def test_interrupted_training_leaves_nothing(tiny_catalog: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                             capfd: pytest.CaptureFixture) -> None:
    import train.loop

    monkeypatch.setattr(train.loop, "fit", _interrupt)
    out = tmp_path / "out"
    out.mkdir()
    assert cli.main(["train", *TINY_TRAIN, "--catalog", str(tiny_catalog), "--run", str(out / "run")]) == 130
    assert list(out.iterdir()) == []  # neither a half-written run nor a staging folder


def test_interrupted_overwrite_keeps_existing_run(run_copy: Path, tiny_catalog: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    import train.loop
    from configs import load_config

    monkeypatch.setattr(train.loop, "fit", _interrupt)
    before = _snapshot(run_copy)
    with pytest.raises(KeyboardInterrupt):
        train.loop.train(load_config("tiny", ["train.epochs=1"]), tiny_catalog, run_copy, progress=False,
                         overwrite=True)
    assert _snapshot(run_copy) == before
    assert sorted(p.name for p in run_copy.parent.iterdir()) == ["run"]


# --- permissions ------------------------------------------------------------------------------------------


def test_created_folders_get_normal_permissions(tiny_catalog: Path, tmp_path: Path,
                                                capsys: pytest.CaptureFixture) -> None:
    """prepare, train and build-index build in temporary folders; what they publish is 0755 under umask 022."""
    src = tmp_path / "src"
    (src / "posters").mkdir(parents=True)
    shutil.copyfile(next((tiny_catalog / "media" / "posters").iterdir()), src / "posters" / "a.jpg")
    items, interactions = _csvs(src, "item_id,title,image_path\n1,Alpha,posters/a.jpg\n2,Beta,\n",
                                "user_id,item_id,timestamp\nu1,1,100\nu1,2,200\n")
    old = os.umask(0o022)
    try:
        catalog, run = tmp_path / "catalog", tmp_path / "run"
        assert cli.main(["prepare", "--items", str(items), "--interactions", str(interactions),
                         "--out", str(catalog)]) == 0
        assert cli.main(["train", *TINY_TRAIN, "--catalog", str(tiny_catalog), "--run", str(run)]) == 0
        assert cli.main(["build-index", "--run", str(run), "--device", "cpu", "--quiet"]) == 0
    finally:
        os.umask(old)
    capsys.readouterr()
    version = live_version(run / "index")
    folders = [catalog, catalog / "media", catalog / "media" / "posters", run, run / "index", version]
    assert {str(f): oct(stat.S_IMODE(f.stat().st_mode)) for f in folders} == {str(f): "0o755" for f in folders}
    files = [p for top in (catalog, run) for p in top.rglob("*") if p.is_file()]
    assert files and {str(f): oct(stat.S_IMODE(f.stat().st_mode)) for f in files} == {str(f): "0o644" for f in files}


@pytest.mark.parametrize("command", ["build-index", "reindex", "query", "train-rerank", "train-reasons", "evaluate"])
def test_a_missing_run_is_named_before_torch_is_imported(command: str, tmp_path: Path) -> None:
    """The run is checked first: saying that it is missing never waits for torch and the models to import."""
    args = [command, "--run", str(tmp_path / "missing")] + (["--user", "1"] if command == "query" else [])
    code = ("import sys, cli; rc = cli.main(sys.argv[1:]); "
            "assert 'torch' not in sys.modules, 'torch was imported'; sys.exit(rc)")
    proc = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True,
                          cwd=Path(cli.__file__).parent)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().splitlines() == [
        f"towerrec {command}: error: {tmp_path / 'missing'}: run directory not found (run `towerrec train` first)"]


def test_help_imports_neither_polars_nor_torch() -> None:
    """``--help`` builds every subcommand's parser from light modules: it never waits for polars or torch."""
    code = ("import sys, cli\ntry:\n    cli.main(['--help'])\nexcept SystemExit as e:\n    rc = e.code\n"
            "heavy = sorted(m for m in ('polars', 'torch', 'numpy', 'faiss', 'transformers') if m in sys.modules)\n"
            "assert not heavy, heavy; sys.exit(rc)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=Path(cli.__file__).parent)
    assert proc.returncode == 0, proc.stderr
    assert "prepare" in proc.stdout and "query" in proc.stdout


def test_every_format_prepare_shows_has_an_importer() -> None:
    from data.formats import FORMATS
    from data.importers import IMPORTERS

    assert list(IMPORTERS) == list(FORMATS)
    assert all(IMPORTERS[name].description == text for name, text in FORMATS.items())
