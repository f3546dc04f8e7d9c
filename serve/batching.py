"""Dynamic batching of ``POST /recommend``, as Triton's dynamic batcher and Ray Serve's ``@serve.batch`` do.

Concurrent requests are gathered into one batch and answered together by a single worker thread
(:meth:`rerank.Pipeline.recommend_each`): every history goes through one user-tower forward, requests with the
same filters share one FAISS search, and each request's own ``k``, filters, rerank and explain are applied to its
own rows. A batch closes when it holds ``max_batch`` requests, when its histories hold ``max_items`` items (what
the user-tower forward must hold in memory), or ``max_wait_ms`` after its first request, whichever comes first.
The worker waits only while more requests are on their way: a request that arrives alone is answered at once,
and no request waits longer than the window for others.

Requests keep the index version they arrived on: each version has its own queue and worker thread, so across a
hot reload each answer names the version that produced it, and a request on the new version never waits behind
one on the old. A version's towers, tokenizers and FAISS index are used by its worker thread only (for
``/recommend``; ``/similar`` takes the version's lock, which the worker also holds while it answers).
``max_batch=1`` is the one-at-a-time path: the same worker, one request per forward.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from concurrent.futures import Future
from contextlib import contextmanager
from dataclasses import dataclass, field

from errors import ConfigError, TowerrecError

logger = logging.getLogger(__name__)

MAX_BATCH = 32  # requests per batch
MAX_WAIT_MS = 5.0  # how long a batch waits for more requests after its first one
MAX_ITEMS = 50_000  # history items per batch: bounds the memory of the user-tower forward


class Ticket:
    """A request on its way (see :meth:`Batcher.coming`): counted until a batch takes it or it gives up."""

    def __init__(self):
        self.counted = True


@dataclass
class _Request:
    served: object  # serve.live.Served: the version this request arrived on
    call: dict  # Pipeline.recommend keyword arguments
    items: int  # how many history items it brings
    ticket: Ticket | None = None
    arrived: float = field(default_factory=time.perf_counter)
    future: Future = field(default_factory=Future)


class _Lane:
    """One version's queue and worker thread."""

    def __init__(self, key: int):
        self.key = key
        self.queue: queue.Queue[_Request | None] = queue.Queue()
        self.carry: _Request | None = None  # a request that did not fit the last batch: it opens the next
        self.thread: threading.Thread | None = None


class Batcher:
    """Gathers concurrent recommend calls into batches, one worker thread per index version (see the module
    docstring): a version being warmed up or drained never waits for another."""

    IDLE_S = 30.0  # a version's worker ends after this long without a request (a new one starts on demand)

    def __init__(self, max_batch: int = MAX_BATCH, max_wait_ms: float = MAX_WAIT_MS, max_items: int = MAX_ITEMS):
        if isinstance(max_batch, bool) or not isinstance(max_batch, int) or max_batch < 1:
            raise ConfigError(f"batch size must be a whole number >= 1, got {max_batch!r}")
        if not 0 <= max_wait_ms <= 1000:
            raise ConfigError(f"batch wait must be 0 to 1000 ms, got {max_wait_ms!r}")
        if isinstance(max_items, bool) or not isinstance(max_items, int) or max_items < 1:
            raise ConfigError(f"batch item limit must be a whole number >= 1, got {max_items!r}")
        self.max_batch, self.max_wait, self.max_items = max_batch, max_wait_ms / 1000, max_items
        self._lanes: dict[int, _Lane] = {}
        self._lock = threading.Lock()
        self._coming = 0  # requests announced (being read) or queued, not yet taken into a batch
        self.batches = 0  # how many batches were answered, and how many requests in all
        self.requests = 0

    def start(self) -> None:
        """Workers start on demand; nothing to do (kept for symmetry with :meth:`stop`)."""

    def stop(self) -> None:
        """End every worker once its queue is answered."""
        with self._lock:
            lanes = list(self._lanes.values())
            self._lanes.clear()  # a later request starts a fresh worker
            for lane in lanes:
                lane.queue.put(None)
        for lane in lanes:
            if lane.thread is not None:
                lane.thread.join(timeout=10)

    @contextmanager
    def coming(self):
        """Announce a request from the moment it arrives (before its body is read), so that a batch being
        gathered waits for it; yields the :class:`Ticket` to pass to :meth:`submit`."""
        ticket = Ticket()
        with self._lock:
            self._coming += 1
        try:
            yield ticket
        finally:
            self._uncount(ticket)  # refused before it was queued, or already taken into a batch

    def _uncount(self, ticket: Ticket | None) -> None:
        if ticket is not None:
            with self._lock:
                if ticket.counted:
                    ticket.counted = False
                    self._coming -= 1

    def submit(self, served, call: dict, items: int, ticket: Ticket | None = None):
        """Queue one call on ``served`` and wait for its answer (a :class:`Results`; a towerrec error is raised)."""
        request = _Request(served, call, items, ticket)
        with self._lock:  # under the lock: a lane never retires with a request in its queue
            lane = self._lanes.get(id(served))
            if lane is None:
                lane = self._lanes[id(served)] = _Lane(id(served))
                lane.thread = threading.Thread(target=self._run, args=(lane,), name="towerrec-batcher",
                                               daemon=True)
                lane.thread.start()
            lane.queue.put(request)
        return request.future.result()

    # -- the workers --------------------------------------------------------------------------------------------
    def _run(self, lane: _Lane) -> None:
        while True:
            batch = self._gather(lane)
            if batch is None:
                return
            try:
                self._answer(batch)
            except Exception as err:  # every caller of this batch gets it: a towerrec error is its 4xx, a bug
                for r in batch:          # a 500 that the server logs once, with its traceback
                    if not r.future.done():
                        r.future.set_exception(err)

    def _next(self, lane: _Lane, timeout: float) -> _Request | None:
        """The lane's next request; None when it should stop (asked to, or idle: then it is retired)."""
        while True:
            try:
                return lane.queue.get(timeout=timeout)
            except queue.Empty:
                with self._lock:
                    if lane.queue.empty():
                        self._lanes.pop(lane.key, None)
                        return None

    def _gather(self, lane: _Lane) -> list[_Request] | None:
        first = lane.carry or self._next(lane, self.IDLE_S)
        lane.carry = None
        if first is None:
            return None
        self._uncount(first.ticket)
        batch, items = [first], first.items
        deadline = first.arrived + self.max_wait
        while len(batch) < self.max_batch:
            try:
                nxt = lane.queue.get_nowait()
            except queue.Empty:
                with self._lock:  # wait only for requests on their way (announced, not yet taken)
                    waiting_for = self._coming
                left = deadline - time.perf_counter()
                if waiting_for <= 0 or left <= 0:
                    break
                try:
                    nxt = lane.queue.get(timeout=left)
                except queue.Empty:
                    break
            if nxt is None:
                lane.queue.put(None)  # stop after this batch
                break
            self._uncount(nxt.ticket)
            if items + nxt.items > self.max_items:
                lane.carry = nxt
                break
            batch.append(nxt)
            items += nxt.items
        return batch

    def _answer(self, batch: list[_Request]) -> None:
        served = batch[0].served
        with served.lock:
            answers = served.rec.recommend_each([r.call for r in batch], [r.arrived for r in batch])
        for r, a in zip(batch, answers):
            if isinstance(a, TowerrecError):
                r.future.set_exception(a)
            else:
                r.future.set_result(a)
        with self._lock:
            self.batches += 1
            self.requests += len(batch)
