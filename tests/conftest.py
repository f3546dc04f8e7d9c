"""Shared fixtures: a synthetic tiny catalog and run, the real datasets under ../shared/datasets (tests that
use them are marked `data` and skip where they are absent), the offline hub, and the `gpu` marker."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# Tests never touch the network: any hub lookup must resolve from local files or fail.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"

SHARED_DATASETS = Path(__file__).resolve().parents[2] / "shared" / "datasets"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Mark `data` every test that reads ../shared/datasets; skip tests marked `gpu` where CUDA is absent
    (they must never fall back to CPU and pass)."""
    for item in items:
        if "shared_datasets" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.data)
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


# One intra-op thread: on this 2-core machine (often shared with other jobs) OpenMP's spinning workers make
# the tiny models' small matmuls ~100x slower with 2 threads than with 1 (15 ms vs 50 us per 64x32x32 linear).
os.environ.setdefault("OMP_NUM_THREADS", "1")
try:
    import torch as _torch

    _torch.set_num_threads(1)
except ImportError:  # pragma: no cover - torch is a hard dependency
    pass


# --- a small synthetic multimodal catalog and a trained tiny run, shared by the towers/index/CLI tests -------


@pytest.fixture(scope="session")
def synthetic_media(tmp_path_factory: pytest.TempPathFactory):
    """The generated items, interactions and media files behind ``tiny_catalog`` (see tests/synthetic.py)."""
    from synthetic import synthetic_catalog

    return synthetic_catalog(tmp_path_factory.mktemp("synthetic-media"))


@pytest.fixture(scope="session")
def tiny_catalog(synthetic_media, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Catalog folder: 150 synthetic films, 60 users, text + posters (every 6th withheld) + 4 audio clips."""
    from data.catalog import write_catalog

    out = tmp_path_factory.mktemp("tiny") / "catalog"
    write_catalog(out, synthetic_media.items, synthetic_media.interactions, synthetic_media.media,
                  meta={"source": "tests: synthetic"})
    return out


@pytest.fixture(scope="session")
def sample_poster(synthetic_media) -> Path:
    """A generated JPEG poster."""
    return next(src for rel, src in synthetic_media.media.items() if rel.endswith(".jpg"))


@pytest.fixture(scope="session")
def sample_clips(synthetic_media) -> list[Path]:
    """The generated OGG Vorbis clips (1 to 2.5 s of decaying tones)."""
    return [src for rel, src in synthetic_media.media.items() if rel.endswith(".ogg")]


@pytest.fixture(scope="session")
def tiny_run(tiny_catalog: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A run directory trained for one epoch with the `tiny` config, with a live Flat index."""
    from configs import load_config
    from index.build import build_index
    from train.loop import train

    run = tmp_path_factory.mktemp("tiny-run") / "run"
    train(load_config("tiny", ["train.epochs=1"]), tiny_catalog, run, progress=False)
    build_index(run, progress=False)
    return run
