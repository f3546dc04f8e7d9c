"""Device selection: CUDA when asked and present, an error (never a silent CPU run) when asked and absent."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from configs import load_config
from towers.device import resolve_device
from train.loop import train


def test_auto_picks_cuda_only_when_present() -> None:
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert resolve_device("cpu").type == "cpu"


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only machine")
def test_cuda_without_cuda_is_an_error(tiny_catalog: Path, tmp_path: Path) -> None:
    with pytest.raises(RuntimeError, match="CUDA is not available"):
        resolve_device("cuda")
    with pytest.raises(RuntimeError, match="CUDA is not available"):
        train(load_config("tiny", ["train.device=cuda", "train.epochs=1"]), tiny_catalog, tmp_path / "run")
    assert not (tmp_path / "run" / "towers.safetensors").exists()


@pytest.mark.gpu
def test_training_and_serving_run_on_cuda(tiny_catalog: Path, tmp_path: Path) -> None:
    from index.build import build_index
    from index.recommender import Recommender
    from towers.factory import load_towers

    run = tmp_path / "run"
    result = train(load_config("tiny", ["train.device=cuda", "train.epochs=1"]), tiny_catalog, run, progress=False)
    assert 0.0 <= result.test["ndcg@10"] <= 1.0
    model = load_towers(run, "cuda")
    assert all(p.device.type == "cuda" for p in model.parameters())
    build_index(run, device="cuda", progress=False)
    rec = Recommender.load(run, device="cuda")
    user = rec.history_of(next(iter(rec.histories)))
    on_gpu = rec.embed_histories([user])
    cpu = Recommender.load(run, device="cpu").embed_histories([user])
    assert torch.allclose(torch.as_tensor(on_gpu), torch.as_tensor(cpu), atol=1e-3)
