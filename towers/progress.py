"""towerrec's one rule for progress bars: on stderr, and only when stderr is a terminal.

Every long loop (training, embedding, evaluating, fine-tuning) wraps its iterable in :func:`tqdm` from here instead
of ``tqdm.auto``. Output meant for programs (``--json``) then stays clean: a bar never reaches stdout, and none is
drawn into a pipe or a log file, where tqdm's carriage returns would pile up as noise. The commands turn bars off
altogether under ``--quiet`` and ``--json`` by passing ``disable=True``.

It lives in ``towers/`` because both the training code (``train/``) and the serving code (``index/``) use it, and
serving code never imports ``train/``.
"""

from __future__ import annotations

import sys
from typing import Any

from tqdm import tqdm as _tqdm


def show_progress() -> bool:
    """True when a progress bar may be drawn: stderr is an interactive terminal."""
    stream = sys.stderr
    try:
        return stream is not None and stream.isatty()
    except (AttributeError, ValueError):  # a replaced or closed stream
        return False


def tqdm(*args: Any, disable: bool = False, **kwargs: Any) -> _tqdm:
    """A ``tqdm`` bar (same arguments) written to stderr, disabled when ``disable`` or stderr is no terminal."""
    kwargs.setdefault("file", sys.stderr)
    return _tqdm(*args, disable=bool(disable) or not show_progress(), **kwargs)
