"""The recommender a server answers from, replaced whole when a new index version goes live.

A background thread reads the run's ``index/LIVE`` pointer every ``poll_s`` seconds (one small file read).
When it names another version, that version is loaded completely (towers, index, histories) beside the one
being served, answers one warm-up query, and only then replaces it in a single assignment. A request takes
:attr:`LiveRecommender.current` once, at its start, and uses that :class:`Served` to the end: requests in
flight finish on the old version, and every answer comes from exactly one version. The old version is freed
when its last request lets go of it. The run's serving histories are watched the same way: when
``histories.parquet`` is replaced (``towerrec forget`` erased a user), the served version is loaded again, so
an erased user is unknown within one poll period.

A version that fails to load (missing, corrupt, built for other towers) is logged and reported by
:attr:`LiveRecommender.reload_error`; the server keeps answering from the version it has, and tries again
when ``LIVE`` moves on. The error clears when a version loads, or when ``LIVE`` names the served version
again (the failed one is no longer asked for). A reload that works is logged at INFO, one that fails at ERROR.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from data.rundir import RunDir
from errors import IndexStateError, TowerrecError
from index.store import Manifest, live_name
from rerank.pipeline import Pipeline

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Served:
    """One loaded index version and what the server needs to answer from it."""

    rec: Pipeline  # retrieval, then the LLM stages
    name: str  # the version folder's name, as LIVE names it
    manifest: Manifest
    users: list  # every known user id, sorted (the /users listing pages through it)
    loaded_at: float  # unix time the version went live in this process
    histories: tuple | None = None  # (inode, size, mtime_ns) of histories.parquet when it was read
    # One query at a time per Pipeline: the tokenizers and the LLM's KV cache are not thread-safe, and on
    # CPU one query already uses the cores torch is given. Versions have their own lock, so a version being
    # warmed up never waits for the one being served.
    lock: threading.Lock = field(default_factory=threading.Lock, compare=False, repr=False)


def _sorted_ids(ids) -> list:
    """Ids in natural order: integers by value, then strings (a catalog uses one kind, but never fail)."""
    return sorted(ids, key=lambda i: (isinstance(i, str), i))


class LiveRecommender:
    """Serves the live index version of a run, reloading (off the request path) when ``LIVE`` changes."""

    def __init__(self, run_dir: str | Path, device: str = "auto", poll_s: float = 1.0):
        """Load the live version now (a clear :class:`TowerrecError` if there is none); ``poll_s``: watch period."""
        self.run = RunDir(run_dir).require()
        self.device = device
        self.poll_s = float(poll_s)
        # Why the last reload failed; None once a version loads, or once LIVE names the served version again.
        self.reload_error: str | None = None
        self._failed: str | None = None  # the version name that failed, not retried until LIVE moves on
        self._reload_lock = threading.Lock()  # one reload at a time (the watcher, or a caller of check())
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        name = self.live_name()
        if name is None:
            raise IndexStateError(f"{self.run.index_root}: no index built yet (run `towerrec build-index`)")
        self._current = self._load(name)

    @property
    def current(self) -> Served:
        """The version serving now. Take it once per request and keep using that object."""
        return self._current

    def live_name(self) -> str | None:
        """The version ``LIVE`` names now, or ``None`` when there is no pointer (yet, or any more).

        A pointer that is empty, unreadable or names anything but a version folder directly inside the index
        folder (``../x``, ``/etc``, a staging folder) is an :class:`IndexStateError`: nothing outside the run's
        index folder is ever loaded.
        """
        return live_name(self.run.index_root)

    def _histories_stamp(self) -> tuple | None:
        try:
            st = (self.run.path / RunDir.HISTORIES).stat()
        except OSError:
            return None
        return st.st_ino, st.st_size, st.st_mtime_ns

    def _load(self, name: str) -> Served:
        t0 = time.perf_counter()
        stamp = self._histories_stamp()  # before reading: a change while loading is seen at the next check
        rec = Pipeline.load(self.run.path, device=self.device, version=name)
        manifest = Manifest.read(self.run.index_root / name / RunDir.MANIFEST)
        users = _sorted_ids(rec.histories)
        if users:  # warm-up: lazy initialisation happens here, not in the first user's request
            rec.recommend(user_id=users[0], k=1, rerank=False)
        logger.info("loaded index version %s in %.1fs", name, time.perf_counter() - t0)
        return Served(rec=rec, name=name, manifest=manifest, users=users, loaded_at=time.time(), histories=stamp)

    def check(self) -> bool:
        """Reload if ``LIVE`` names a version other than the one served, or the served version's histories were
        replaced; True when what is served changed.

        Called by the watcher thread; tests may call it directly. A failed load keeps the current version.
        """
        with self._reload_lock:
            try:
                name = self.live_name()
            except IndexStateError as err:  # a bad pointer: keep serving, and say why on /health
                if self.reload_error != str(err):
                    logger.error("keeping index version %s: %s", self._current.name, err)
                self._failed, self.reload_error = None, str(err)
                return False
            if name is not None and name == self._current.name and self.reload_error is not None:
                # LIVE points back at the version being served: the failed one is no longer asked for.
                logger.info("index version %s is live again; dropping the failed reload of %s",
                            name, self._failed)
                self._failed, self.reload_error = None, None
            fresh = name == self._current.name and self._histories_stamp() == self._current.histories
            if name is None or fresh or (name == self._failed and name != self._current.name):
                return False
            try:
                served = self._load(name)
            except Exception as err:  # noqa: BLE001 - whatever went wrong, keep serving the version we have
                self._failed = name
                self.reload_error = f"index version {name}: {err}"
                logger.error("keeping index version %s: cannot load %s", self._current.name, self.reload_error,
                             exc_info=not isinstance(err, TowerrecError))
                return False
            # The error is cleared first, so whoever sees the new version never sees the old version's error.
            self._failed, self.reload_error = None, None
            old, self._current = self._current.name, served  # the swap: one reference assignment
            logger.info("now serving index version %s (was %s)", name, old)
            return True

    # -- the watcher thread ----------------------------------------------------------------------------------
    def start(self) -> None:
        """Start watching ``LIVE`` in a daemon thread (no-op when already started or ``poll_s <= 0``)."""
        if self._thread is not None or self.poll_s <= 0:
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._watch, name="towerrec-index-watcher", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop the watcher thread (waits for a reload in progress to end)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def _watch(self) -> None:
        while not self._stop.wait(self.poll_s):
            try:
                self.check()
            except Exception:  # e.g. the index folder unreadable: the watcher lives on and sees the next change
                logger.exception("index watcher: cannot check %s", self.run.index_root / RunDir.LIVE)
