"""Shared fixtures: the real datasets under ../shared/datasets, offline hub, and the `gpu` marker."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# Tests never touch the network: any hub lookup must resolve from local files or fail.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"

SHARED_DATASETS = Path(__file__).resolve().parents[2] / "shared" / "datasets"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Skip tests marked `gpu` where CUDA is absent (they must never fall back to CPU and pass)."""
    gpu_items = [item for item in items if item.get_closest_marker("gpu") is not None]
    if not gpu_items:
        return
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="marked gpu: CUDA is not available")
    for item in gpu_items:
        item.add_marker(skip)


@pytest.fixture(scope="session")
def shared_datasets() -> Path:
    """The read-only real datasets folder (skips the test where it is absent)."""
    if not SHARED_DATASETS.is_dir():
        pytest.skip(f"shared datasets not found at {SHARED_DATASETS}")
    return SHARED_DATASETS


@pytest.fixture(scope="session")
def ml100k_dir(shared_datasets: Path) -> Path:
    """The MovieLens-100K release plus TMDB text and posters."""
    path = shared_datasets / "movielens-100k-mm"
    if not (path / "u.data").is_file():
        pytest.skip(f"MovieLens-100K not found at {path}")
    return path
