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


# One intra-op thread: on this 2-core machine (often shared with other jobs) OpenMP's spinning workers make
# the tiny models' small matmuls ~100x slower with 2 threads than with 1 (15 ms vs 50 us per 64x32x32 linear).
os.environ.setdefault("OMP_NUM_THREADS", "1")
try:
    import torch as _torch

    _torch.set_num_threads(1)
except ImportError:  # pragma: no cover - torch is a hard dependency
    pass


# --- a small real multimodal catalog and a trained tiny run, shared by the towers/index/CLI tests --------

# Real clips from shared/datasets/audio-clips (short ones: decoding is cropped to the tiny config's 2 s).
TINY_AUDIO_CLIPS = (
    "456440__inspectorj__bird-whistling-robin-single-13.ogg",
    "sorohanro_-_solo-trumpet-06.ogg",
    "198-209-0000.ogg",
    "5703-47212-0000.ogg",
)


def _tiny_catalog_tables(ml100k: Path, audio_dir: Path):
    """Items and interactions of a small slice of ML-100K, plus the media files to copy into the catalog.

    The 150 most rated movies; the first 60 users (by id) with 10 to 40 ratings among them. Titles, TMDB
    overviews as ``text`` and posters as ``image_path``; every 6th item has its poster withheld (missing
    image) and four of the most rated items get a real audio clip.
    """
    import polars as pl

    ratings = pl.read_csv(ml100k / "u.data", separator="\t", has_header=False,
                          new_columns=["user_id", "item_id", "rating", "timestamp"])
    top = (ratings.group_by("item_id").len().sort(["len", "item_id"], descending=[True, False])
           .head(150)["item_id"])
    sliced = ratings.filter(pl.col("item_id").is_in(top.implode()))
    counts = sliced.group_by("user_id").len().sort("user_id")
    users = counts.filter((pl.col("len") >= 10) & (pl.col("len") <= 40)).head(60)["user_id"]
    interactions = sliced.filter(pl.col("user_id").is_in(users.implode())).sort(["user_id", "timestamp"])

    titles = pl.read_csv(ml100k / "u.item", separator="|", has_header=False, encoding="latin1", quote_char=None,
                         infer_schema=False).select(
        pl.col("column_0").cast(pl.Int64).alias("item_id"), pl.col("column_1").alias("title"))
    tmdb = pl.read_csv(ml100k / "tmdb" / "items.csv", infer_schema=False).select(
        pl.col("movie_id").cast(pl.Int64).alias("item_id"), pl.col("overview").alias("text"),
    ).unique("item_id", keep="first")
    item_ids = sorted(top.to_list())
    items = (pl.DataFrame({"item_id": item_ids}).join(titles, on="item_id", how="left")
             .join(tmdb, on="item_id", how="left")
             .with_columns(pl.col("title").str.extract(r"\((\d{4})\)\s*$").cast(pl.Int64).alias("year")))
    media: dict[str, Path] = {}
    image_paths, audio_paths = [], []
    popular = top.head(len(TINY_AUDIO_CLIPS)).to_list()
    for pos, item_id in enumerate(item_ids):
        poster = ml100k / "posters" / f"{item_id}.jpg"
        if pos % 6 != 5 and poster.is_file():
            rel = f"media/posters/{item_id}.jpg"
            media[rel] = poster
            image_paths.append(rel)
        else:
            image_paths.append(None)
        if item_id in popular:
            clip = TINY_AUDIO_CLIPS[popular.index(item_id)]
            rel = f"media/audio/{clip}"
            media[rel] = audio_dir / clip
            audio_paths.append(rel)
        else:
            audio_paths.append(None)
    items = items.with_columns(pl.Series("image_path", image_paths, dtype=pl.Utf8),
                               pl.Series("audio_path", audio_paths, dtype=pl.Utf8))
    return items, interactions, media


@pytest.fixture(scope="session")
def tiny_catalog(ml100k_dir: Path, shared_datasets: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Catalog folder: 150 real ML-100K movies, 60 users, text + posters (some withheld) + 4 audio clips."""
    from data.catalog import write_catalog

    audio_dir = shared_datasets / "audio-clips"
    if not all((audio_dir / clip).is_file() for clip in TINY_AUDIO_CLIPS):
        pytest.skip(f"audio clips not found in {audio_dir}")
    items, interactions, media = _tiny_catalog_tables(ml100k_dir, audio_dir)
    out = tmp_path_factory.mktemp("tiny") / "catalog"
    write_catalog(out, items, interactions, media, meta={"source": "tests: ML-100K slice"})
    return out


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
