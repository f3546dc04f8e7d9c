"""A uvicorn server in a thread of the test process, on a free port, over a run's live index."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from serve.api import bind, create_app
from serve.batching import Batcher
from serve.live import LiveRecommender
from serve.media import CatalogMedia


@dataclass
class Running:
    url: str
    live: LiveRecommender
    client: httpx.Client
    batcher: Batcher | None = None


@contextmanager
def running_server(run_dir: Path, poll_s: float = 0.0, max_body: int | None = None,
                   batcher: Batcher | None | str = "default", allow_forget: bool = False) -> Iterator[Running]:
    """Serve ``run_dir`` over real HTTP (uvicorn on 127.0.0.1, any free port) until the block ends, with dynamic
    batching as ``serve`` has it (``batcher=None``: each request on its own)."""
    import uvicorn

    live = LiveRecommender(run_dir, device="cpu", poll_s=poll_s)
    kwargs = {} if max_body is None else {"max_body": max_body}
    batcher = Batcher() if batcher == "default" else batcher
    app = create_app(live, CatalogMedia.for_run(run_dir), batcher=batcher, allow_forget=allow_forget, **kwargs)
    sock = bind("127.0.0.1", 0)
    url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    server = uvicorn.Server(uvicorn.Config(app, log_config=None, access_log=False))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("test server did not start")
        time.sleep(0.02)
    try:
        with httpx.Client(base_url=url, timeout=60) as client:
            yield Running(url, live, client, batcher)
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        sock.close()


@pytest.fixture(scope="session")
def server(tiny_run: Path) -> Iterator[Running]:
    """The shared tiny run, served read-only (no reload: nothing publishes to it)."""
    with running_server(tiny_run) as running:
        yield running


@pytest.fixture(scope="session")
def serve_run():
    """``serve_run(run_dir, poll_s=...)``: a context manager serving a run of the test's own (see ``running_server``)."""
    return running_server
