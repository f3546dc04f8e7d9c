"""Fixtures shared by the index tests: the tiny run loaded for serving, and a user with a mid-length history."""

from __future__ import annotations

from pathlib import Path

import pytest

from index.recommender import Recommender


@pytest.fixture(scope="module")
def rec(tiny_run: Path) -> Recommender:
    """The tiny run on the CPU, one per test module (tests may reconfigure it)."""
    return Recommender.load(tiny_run, device="cpu")


@pytest.fixture(scope="module")
def user(rec: Recommender):
    """The user whose history is the median length (ties broken by id)."""
    return sorted(rec.histories, key=lambda u: (len(rec.histories[u]), u))[len(rec.histories) // 2]
