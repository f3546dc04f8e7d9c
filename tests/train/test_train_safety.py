"""train, train-rerank and train-reasons never delete or replace what is not theirs, leave no staging folder behind
(a killed training's is removed by the next one), refuse settings they cannot honour before any work, and report
in one line (or one line of JSON with --json)."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import cli
from configs import load_config
from data.rundir import RunDir, owner_record
from errors import CheckpointError, ConfigError
from rerank.llm import read_adapter, write_adapter
from train.loop import train

TINY = ["--config", "tiny", "--set", "train.epochs=1", "--quiet"]
ITEMS = ["user.input=items", "user.init=random", "item.image.enabled=false", "item.audio.enabled=false"]


def _error_line(capsys: pytest.CaptureFixture, command: str) -> str:
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"towerrec {command}: error: "), err
    return lines[0]


def _tree(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


# -- refusals before any work: no staging folder -----------------------------------------------------------------


def test_refused_resume_creates_no_staging_folder(tiny_catalog: Path, tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="no resumable training state"):
        train(load_config("tiny", [*ITEMS, "train.resumable=true"]), tiny_catalog, tmp_path / "run", progress=False,
              resume=True)
    with pytest.raises(ConfigError, match=r"--resume: only item-sequence training \(user.input=items\)"):
        train(load_config("tiny"), tiny_catalog, tmp_path / "run", progress=False, resume=True)
    assert list(tmp_path.iterdir()) == []


def test_saved_state_is_never_continued_unasked(tiny_catalog: Path, tmp_path: Path) -> None:
    state = RunDir(tmp_path / "run").resume_path
    state.write_bytes(b"an interrupted training's state")
    with pytest.raises(CheckpointError, match=r"interrupted training's saved state is there; pass --resume"):
        train(load_config("tiny", [*ITEMS, "train.resumable=true"]), tiny_catalog, tmp_path / "run", progress=False)
    assert state.read_bytes() == b"an interrupted training's state"
    assert [p.name for p in tmp_path.iterdir()] == [state.name]


def test_resumable_needs_item_sequence_input(tiny_catalog: Path, tmp_path: Path, capsys) -> None:
    with pytest.raises(ConfigError, match=r"--set train.resumable=true: train.resumable: only item-sequence"):
        load_config("tiny", ["train.resumable=true"])
    assert load_config("tiny", [*ITEMS, "train.resumable=true"]).train.resumable
    config = load_config("tiny")  # a config built in Python is checked too
    with pytest.raises(ConfigError, match="train.resumable: .*user.input='text'"):
        dataclasses.replace(config, train=dataclasses.replace(config.train, resumable=True))
    code = cli.main(["train", *TINY, "--set", "train.resumable=true", "--catalog", str(tiny_catalog),
                     "--run", str(tmp_path / "run")])
    assert code == 2 and "train.resumable" in _error_line(capsys, "train")
    assert list(tmp_path.iterdir()) == []


# -- what is not a run is never replaced -------------------------------------------------------------------------


def test_overwrite_never_replaces_what_is_not_a_run(tiny_catalog: Path, tmp_path: Path, capsys) -> None:
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "todo.txt").write_text("mine")
    (notes / "config.json").write_text('{"not": "a towerrec config"}')
    a_file = tmp_path / "a-file"
    a_file.write_text("mine too")
    os.symlink(notes, tmp_path / "a-link")
    before = _tree(tmp_path)
    for target, message in [(notes, "already holds files and is no towerrec run"),
                            (a_file, "exists and is not a folder"), (tmp_path / "a-link", "is a symbolic link")]:
        code = cli.main(["train", *TINY, "--catalog", str(tiny_catalog), "--run", str(target), "--overwrite"])
        assert code == 2 and message in _error_line(capsys, "train")
    assert _tree(tmp_path) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file", "a-link", "notes"]  # no staging folder


def test_what_appears_at_the_run_path_while_training_is_kept(tiny_catalog: Path, tmp_path: Path,
                                                             monkeypatch) -> None:
    """The path is checked again when the run is published: files put there meanwhile are never replaced."""
    import train.loop

    real = train.loop.write_run

    def someone_writes_there(run, *args, **kwargs):
        (tmp_path / "run").mkdir()
        (tmp_path / "run" / "theirs.txt").write_text("theirs")
        return real(run, *args, **kwargs)

    monkeypatch.setattr(train.loop, "write_run", someone_writes_there)
    with pytest.raises(CheckpointError, match="already holds files and is no towerrec run"):
        train.loop.train(load_config("tiny", ["train.epochs=1"]), tiny_catalog, tmp_path / "run", progress=False,
                         overwrite=True)
    assert _tree(tmp_path) == {"run/theirs.txt": b"theirs"}  # the staged run was discarded


# -- staging folders of killed trainings; the report ---------------------------------------------------------


def test_train_removes_dead_staging_folders_and_reports_one_json_line(tiny_catalog: Path, tmp_path: Path,
                                                                      capsys) -> None:
    me = owner_record()
    for name, record in [("dead", dict(me, pid=_dead_pid())), ("live", me)]:
        folder = tmp_path / f".run-training-{name}"
        folder.mkdir()
        (folder / RunDir.OWNER).write_text(json.dumps(record))
        (folder / "metrics.json").write_text("{}")
    code = cli.main(["train", *TINY, "--catalog", str(tiny_catalog), "--run", str(tmp_path / "run"), "--json"])
    assert code == 0
    out = capsys.readouterr().out
    assert out.count("\n") == 1
    report = json.loads(out)
    assert report["run"] == str(tmp_path / "run") and {"best_epoch", "valid", "test_retrieval"} <= set(report)
    assert sorted(p.name for p in tmp_path.iterdir()) == [".run-training-live", "run"]  # a live owner's is kept
    assert RunDir.OWNER not in {p.name for p in (tmp_path / "run").iterdir()}


def test_train_prints_a_one_line_summary(tiny_catalog: Path, tmp_path: Path, capsys) -> None:
    code = cli.main(["train", *TINY, "--catalog", str(tiny_catalog), "--run", str(tmp_path / "run")])
    assert code == 0
    out = capsys.readouterr().out
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    v, t = metrics["valid"], metrics["test"]
    assert out == (f"trained {tmp_path / 'run'}: best epoch {metrics['best_epoch']} of {len(metrics['history'])}, "
                   f"valid NDCG@10 {v['ndcg@10']:.4f} Recall@10 {v['recall@10']:.4f}, test NDCG@10 "
                   f"{t['ndcg@10']:.4f} Recall@10 {t['recall@10']:.4f} ({metrics['seconds']:.1f} s)\n")


# -- fine-tuned adapters: into the run only, weights and record together ---------------------------------------


def test_adapter_record_and_weights_stay_together(tmp_path: Path, monkeypatch) -> None:
    import data.atomic

    first, second = {"w": torch.zeros(2, 3)}, {"w": torch.ones(2, 3)}
    write_adapter(tmp_path, "pointwise", first, {"mode": "pointwise", "best_step": 1})
    _, record, state = read_adapter(tmp_path, "pointwise")
    assert record["best_step"] == 1 and torch.equal(state["w"], first["w"])

    def die(*args, **kwargs):
        raise KeyboardInterrupt  # killed after the weights were replaced, before the record

    monkeypatch.setattr(data.atomic, "write_text", die)
    with pytest.raises(KeyboardInterrupt):
        write_adapter(tmp_path, "pointwise", second, {"mode": "pointwise", "best_step": 2})
    with pytest.raises(CheckpointError, match="describes other weights .* run it again"):
        read_adapter(tmp_path, "pointwise")
    assert sorted(p.name for p in (tmp_path / "rerank").iterdir()) == ["pointwise.json", "pointwise.safetensors"]


def test_adapter_is_written_into_the_run_only(tmp_path: Path) -> None:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    run = tmp_path / "run"
    run.mkdir()
    os.symlink(elsewhere, run / "rerank")
    with pytest.raises(CheckpointError, match="is not a folder of the run"):
        write_adapter(run, "reasons", {"w": torch.zeros(1)}, {"mode": "reasons"})
    assert list(elsewhere.iterdir()) == []
    (run / "rerank").unlink()
    (run / "rerank").write_text("a file")
    with pytest.raises(CheckpointError, match="is not a folder of the run"):
        write_adapter(run, "reasons", {"w": torch.zeros(1)}, {"mode": "reasons"})
    assert (run / "rerank").read_text() == "a file"
