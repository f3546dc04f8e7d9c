"""Fixtures shared by the rerank tests: the tiny run loaded as a pipeline, and a user with a mid-length history."""

from __future__ import annotations

from pathlib import Path

import pytest

from rerank.pipeline import Pipeline


@pytest.fixture(scope="module")
def rec(tiny_run: Path) -> Pipeline:
    """The tiny run on the CPU as a retrieve-rerank-explain pipeline, one per test module (tests may
    reconfigure it)."""
    return Pipeline.load(tiny_run, device="cpu")


@pytest.fixture(scope="module")
def user(rec: Pipeline):
    """The user whose history is the median length (ties broken by id)."""
    return sorted(rec.histories, key=lambda u: (len(rec.histories[u]), u))[len(rec.histories) // 2]
