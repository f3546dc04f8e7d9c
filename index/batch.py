"""Many independent queries answered together (the server's dynamic batches, :mod:`serve.batching`).

Each :class:`Query` keeps its own user or history, ``k``, depth, ``exclude`` and filters, and a bad query fails
alone: its slot holds the :class:`errors.TowerrecError` it raised. Every history is embedded in one user-tower
pass, and the queries with the same filters (all the unfiltered ones, typically) share one search; a query with
filters of its own is searched apart, so its top-``k`` is exact, as :meth:`Recommender.recommend`'s is.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np

from errors import QueryError, TowerrecError
from index.results import Retrieved, check_k, id_list, one_query


@dataclass(frozen=True)
class Query:
    """One query of a batch: the arguments of :meth:`Recommender.recommend` (``depth`` >= ``k``: how many
    candidates to retrieve, e.g. for a reranker)."""

    user_id: object = None
    history: Sequence | None = None
    k: int = 10
    depth: int = 0
    exclude: Iterable | None = None
    allow: Iterable | None = None
    deny: Iterable | None = None
    where: str | None = None

    @property
    def filters(self) -> tuple:
        """What decides the search's item mask: queries with equal filters can share a search."""
        where = self.where if self.where is None or isinstance(self.where, str) else id(self.where)  # an Expr
        return _ids_key(self.allow), _ids_key(self.deny), where


def _ids_key(ids) -> tuple | None:
    return None if ids is None else tuple(map(repr, ids))


@dataclass
class _Prepared:
    slot: int
    history: list
    allow: list | None
    keep: np.ndarray | None
    excluded: list[int]
    depth: int


def retrieve_each(rec, queries: Sequence[Query]) -> list[Retrieved | TowerrecError]:
    """One :class:`Retrieved` (of one query) per query, or the error that query raised; see the module docstring.

    ``rec`` is an :class:`index.recommender.Recommender`."""
    out: list[Retrieved | TowerrecError | None] = [None] * len(queries)
    ready: list[_Prepared] = []
    for slot, q in enumerate(queries):
        try:  # the checks of Recommender.retrieve, per query
            check_k(q.k)
            user_ids, histories = one_query(q.user_id, q.history)
            history = rec.history_of(user_ids[0]) if histories is None else id_list(histories[0], "history")
            allow = None if q.allow is None else id_list(q.allow, "allow")
            keep = rec._keep(allow, q.deny, q.where)
            excluded = rec._rows(history, "history")
            if not excluded:
                raise QueryError("empty history: give at least one item id")
            if q.exclude is not None:
                excluded = excluded + rec._rows(q.exclude, "exclude")
            ready.append(_Prepared(slot, history, allow, keep, excluded, max(q.k, q.depth)))
        except TowerrecError as err:
            out[slot] = err
    if ready:
        users = rec.embed_histories([p.history for p in ready])  # one user-tower pass for the whole batch
        groups: dict[tuple, list[int]] = {}
        for i, p in enumerate(ready):
            groups.setdefault(queries[p.slot].filters, []).append(i)
        for members in groups.values():
            depth = max(ready[i].depth for i in members)
            hits = rec._retrieve(users[members], depth, [ready[i].excluded for i in members], ready[members[0]].keep,
                                 rec.knobs)
            for i, recs in zip(members, rec._lists(hits)):
                p = ready[i]
                out[p.slot] = Retrieved([p.history], [recs[:p.depth]], p.allow, p.keep, [p.excluded])
    return out
