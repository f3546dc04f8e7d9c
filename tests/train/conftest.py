"""Fixtures of the fine-tuning tests (reranker, reasons) on the tiny run."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from rerank.pipeline import Pipeline


@pytest.fixture()
def run(tiny_run: Path, tmp_path: Path) -> Path:
    """A private copy of the tiny run (fine-tuning writes into it)."""
    return Path(shutil.copytree(tiny_run, tmp_path / "run"))


@pytest.fixture(scope="module")
def rec(tiny_run: Path) -> Pipeline:
    """The tiny run's recommender, shared by a module's tests."""
    return Pipeline.load(tiny_run, device="cpu")
