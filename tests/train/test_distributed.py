"""DDP with two CPU processes on gloo (launched by torchrun) equals one process on the same global batch."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import torch
from ddp_common import one_step

from data.catalog import write_catalog

WORKER = Path(__file__).with_name("ddp_worker.py")


@pytest.fixture(scope="module")
def catalog(tmp_path_factory) -> Path:
    rng = np.random.default_rng(0)
    items = pl.DataFrame({"item_id": list(range(1, 21)), "title": [f"item {i}" for i in range(1, 21)]})
    rows = [(u, int(i), t) for u in range(8) for t, i in enumerate(rng.permutation(np.arange(1, 21))[:9])]
    events = pl.DataFrame(rows, schema=["user_id", "item_id", "timestamp"], orient="row")
    out = tmp_path_factory.mktemp("ddp") / "catalog"
    write_catalog(out, items, events)
    return out


@pytest.mark.slow
@pytest.mark.parametrize("loss", ["full", "sampled"])
def test_two_gloo_processes_match_one(catalog: Path, tmp_path: Path, loss: str) -> None:
    single_loss, single_grads = one_step(str(catalog), loss)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(WORKER.parents[2]))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(WORKER), str(catalog), str(tmp_path), loss]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    # Each process returns its share of the global mean (sum over its positions x world / N): the shares average
    # to the single-process loss, and DDP's averaged gradients equal the single-process gradients.
    assert (ranks[0]["loss"] + ranks[1]["loss"]) / 2 == pytest.approx(single_loss, rel=1e-5)
    assert ranks[0]["loss"] != pytest.approx(ranks[1]["loss"])  # the processes really saw different windows
    assert set(ranks[0]["grads"]) == set(single_grads)
    for name, grad in single_grads.items():
        torch.testing.assert_close(ranks[0]["grads"][name], grad, atol=1e-6, rtol=1e-4, msg=name)
        torch.testing.assert_close(ranks[1]["grads"][name], grad, atol=1e-6, rtol=1e-4, msg=name)


@pytest.mark.slow
def test_torchrun_cli_train_writes_one_run(catalog: Path, tmp_path: Path) -> None:
    """`torchrun ... cli.py train --run-dir` trains on 2 gloo processes; process 0 alone writes and reports."""
    repo = WORKER.parents[2]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(repo))
    sets = [f"--set={o}" for o in ["user.input=items", "data.min_count=3", "train.epochs=2",
                                   "item.text.enabled=false", "item.image.enabled=false", "item.audio.enabled=false"]]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(repo / "cli.py"),
           "train", "--config", "tiny", *sets, "--catalog", str(catalog), "--run-dir", str(tmp_path / "run"), "--json"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count('"best_epoch"') == 1  # one report, from process 0
    assert (tmp_path / "run" / "towers.safetensors").is_file() and (tmp_path / "run" / "metrics.json").is_file()
    assert not list(tmp_path.glob(".run-training-*"))  # no staging folder left by any process
