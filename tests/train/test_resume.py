"""A training interrupted after some epochs and resumed follows the same trajectory as an uninterrupted one."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from configs import load_config
from errors import CheckpointError
from train import sequence
from train.loop import train

SETUP = ["user.input=items", "user.init=random", "item.image.enabled=false", "item.audio.enabled=false",
         "train.epochs=4", "train.patience=10", "train.loss=sampled", "train.num_negatives=32",
         "train.resumable=true", "user.dropout=0.2"]  # dropout and sampled negatives: the RNGs must resume too


def test_resumed_run_continues_the_same_trajectory(tiny_catalog: Path, tmp_path: Path, monkeypatch) -> None:
    config = load_config("tiny", SETUP)
    straight = train(config, tiny_catalog, tmp_path / "a", progress=False)
    assert not (tmp_path / ".a.resume.pt").exists()  # removed once the run is complete

    calls = {"n": 0}
    real_epoch = sequence.SequenceTrainer.epoch

    def crash_on_third(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real_epoch(self, *args, **kwargs)

    monkeypatch.setattr(sequence.SequenceTrainer, "epoch", crash_on_third)
    with pytest.raises(KeyboardInterrupt):
        train(config, tiny_catalog, tmp_path / "b", progress=False)
    assert (tmp_path / ".b.resume.pt").is_file() and not (tmp_path / "b").exists()
    monkeypatch.setattr(sequence.SequenceTrainer, "epoch", real_epoch)

    resumed = train(config, tiny_catalog, tmp_path / "b", progress=False, resume=True)
    assert [h["epoch"] for h in resumed.history] == [0, 1, 2, 3]
    for a, b in zip(straight.history, resumed.history):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5, abs=1e-6)
        assert b["ndcg@10"] == pytest.approx(a["ndcg@10"], abs=1e-6)
    assert resumed.test == pytest.approx(straight.test, abs=1e-6)
    saved = json.loads((tmp_path / "b" / "metrics.json").read_text())
    assert saved["best_epoch"] == straight.best_epoch
    assert (tmp_path / "b" / "curves.png").is_file()


def test_resume_without_state_is_an_error(tiny_catalog: Path, tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="no resumable training state"):
        train(load_config("tiny", SETUP), tiny_catalog, tmp_path / "c", progress=False, resume=True)
