"""The Python API is as quiet as the CLI: no load reports or progress bars on stderr unless logging is turned up."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

SCRIPT = """
import logging, sys
if sys.argv[2] == "verbose":
    logging.basicConfig(level=logging.INFO)
from index.recommender import Recommender
from rerank.pipeline import Pipeline
rec = Pipeline.load(sys.argv[1], device="cpu")
print(len(rec.recommend(user_id=next(iter(rec.histories)), k=3, rerank=True)))
"""


def _run(run: Path, mode: str) -> subprocess.CompletedProcess:
    repo = Path(__file__).resolve().parents[2]
    env = dict(os.environ, PYTHONPATH=str(repo), HF_HUB_OFFLINE="1")
    return subprocess.run([sys.executable, "-c", SCRIPT, str(run), mode], env=env, cwd=repo, capture_output=True,
                          text=True, timeout=120)


def test_api_is_quiet_by_default_and_speaks_when_asked(tiny_run: Path) -> None:
    quiet = _run(tiny_run, "quiet")
    assert quiet.returncode == 0, quiet.stderr[-2000:]
    assert quiet.stdout.strip() == "3"
    assert quiet.stderr.strip() == "", quiet.stderr[-2000:]
    verbose = _run(tiny_run, "verbose")
    assert verbose.returncode == 0 and "INFO" in verbose.stderr
