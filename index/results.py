"""What a query returns and how its arguments are read: :class:`Recommendation`, :class:`Results`, :class:`Hits`,
and the checks on ``k`` and on ids that every query path shares."""

from __future__ import annotations

import logging
import numbers
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

from errors import QueryError

logger = logging.getLogger("index.recommender")


@dataclass(frozen=True)
class Recommendation:
    item_id: object
    title: str
    score: float  # final score (after rerank when it ran)
    retrieval_score: float  # cosine similarity from the two towers
    rerank_score: float | None = None  # the LLM reranker's score, when reranked
    reason: str | None = None  # a short personalised reason, when asked for (``explain=True``)
    reason_source: str | None = None  # "llm" (written by the LM, grounded in the history) or "template"
    reason_cites: tuple = ()  # the history item ids the reason names


MAX_K = 1000  # the most items one query returns


class Results(list):
    """One query's answer: a ``list`` of :class:`Recommendation` (best first), so code written for the plain
    list keeps working, plus where and how fast it was answered.

    Attributes:
        version: name of the index version that answered (a folder under ``<run>/index/``).
        latency_ms: wall time of the call, from arguments to answer (for a batch: the whole batch's).
        hint: why the list is shorter than asked where the query itself explains it (e.g. every item of
            ``allow`` is already in the history), else None.
    """

    def __init__(self, items: Iterable[Recommendation] = (), version: str = "", latency_ms: float = 0.0,
                 hint: str | None = None):
        super().__init__(items)
        self.version = version
        self.latency_ms = latency_ms
        self.hint = hint

    @property
    def items(self) -> list[Recommendation]:
        """The recommendations as a plain list."""
        return list(self)

    def __repr__(self) -> str:
        hint = f", hint={self.hint!r}" if self.hint else ""
        return (f"Results(version={self.version!r}, latency_ms={self.latency_ms:.3f}{hint}, "
                f"items={list.__repr__(self)})")


@dataclass(frozen=True)
class Hits:
    """Retrieval for a batch of query vectors (:meth:`Recommender.search_vectors`), as arrays."""

    rows: np.ndarray  # (B, k) int64 items-table rows, best first; -1 past the end of a short list
    scores: np.ndarray  # (B, k) float32 inner products (cosine); -inf past the end
    version: str  # the index version that answered
    latency_ms: float  # wall time of the call


@dataclass(frozen=True)
class Retrieved:
    """A batch of queries after retrieval (:meth:`Recommender.retrieve`), before :meth:`Recommender.answer`."""

    histories: list[list]  # each query's history (item ids, oldest first)
    lists: list[list[Recommendation]]  # each query's candidates, best first
    allow: list | None  # the allow list as given (for hints)
    keep: np.ndarray | None  # the filters' mask over internal ids
    excluded: list[list[int]]  # each query's excluded index-table rows


def one_query(user_id, history) -> tuple[list | None, list | None]:
    """``(user_ids, histories)`` for a query by ``user_id`` or by ``history`` (exactly one of them)."""
    if user_id is None and history is None:
        raise QueryError("give a user_id (a known user) or a history (item ids, oldest first)")
    if user_id is not None and history is not None:
        raise QueryError("give either user_id or history, not both")
    return (None, [history]) if user_id is None else ([user_id], None)


def retrieval_only(rerank, explain) -> None:
    """A Recommender retrieves; reranking and reasons are asked of :class:`rerank.Pipeline`."""
    for name, value in (("rerank", rerank), ("explain", explain)):
        if value:
            raise QueryError(f"{name}=True: a Recommender only retrieves; the LLM stages are rerank.Pipeline's: "
                             f"Pipeline.load(run).recommend(..., {name}=True)")


def check_k(k) -> None:
    """``k`` is an integer from 1 to :data:`MAX_K`."""
    if isinstance(k, bool) or not isinstance(k, numbers.Integral):
        raise QueryError(f"k must be an integer, got {type(k).__name__} {k!r}")
    if k < 1:
        raise QueryError(f"k must be at least 1, got {k}")
    if k > MAX_K:
        raise QueryError(f"k must be at most {MAX_K}, got {k}")


def check_id_type(value, what: str) -> None:
    """Ids are ints or strings; bools, floats and anything else are refused, never coerced."""
    if isinstance(value, bool) or not isinstance(value, (str, numbers.Integral)):
        raise QueryError(f"{what} {value!r} has type {type(value).__name__}; ids are integers or strings")




def id_list(ids, what: str) -> list:
    """A list of ids from a list/tuple/array; a bare string (``"12"``) is refused, not read as ``["1", "2"]``."""
    if isinstance(ids, (str, bytes)) or not isinstance(ids, Iterable):
        raise QueryError(f"{what} must be a list of ids, got {type(ids).__name__} {ids!r}")
    return list(ids.tolist() if isinstance(ids, np.ndarray) else ids)


def allow_hints(allow_rows: list[int], internal_of: np.ndarray, keep: np.ndarray | None, excluded: list[list[int]],
                lists: list[list[Recommendation]], k: int, what: str) -> list[str | None]:
    """Per query, a hint where its list came out short of ``k`` because items of ``allow`` (as index-table rows)
    that pass the other filters were excluded (``what``: excluded as what), else None. ``internal_of`` maps rows
    to FAISS internal ids (-1: retired). Hints are logged (WARNING): one line for a single query, a count for a
    batch."""
    hints: list[str | None] = [None] * len(lists)
    rows = np.unique(np.asarray(allow_rows, dtype=np.int64))
    internal = internal_of[rows]
    passing = internal >= 0  # retired items are never recommended: they do not count
    if keep is not None:
        passing &= keep[np.maximum(internal, 0)]
    passing = set(rows[passing].tolist())
    for q, (rows_q, recs) in enumerate(zip(excluded, lists)):
        left_out = passing.intersection(rows_q) if len(recs) < k else set()
        if not left_out:
            continue
        if left_out == passing:
            hints[q] = (f"all {len(passing)} allowed item(s) that pass the filters are {what}, and those are "
                        "never recommended")
        else:
            hints[q] = (f"{len(left_out)} of the {len(passing)} allowed items that pass the filters are {what} "
                        "and were left out")
    given = [h for h in hints if h]
    if len(lists) == 1 and given:
        logger.warning("allow: %s", given[0])
    elif given:
        logger.warning("allow: %d of %d queries came out short because allowed items were %s (see each "
                       "Results.hint)", len(given), len(lists), what)
    return hints
