"""Item id spaces and the maps between them.

An item is addressed four ways: by its row in the catalog's items table, by its dense index in the
leave-one-out split, by its row in the item tower's id table (the split items at training time) and by its
FAISS id in an index. Each space is an :class:`ItemSpace` (an ordered list of the user's item ids); moving
between two spaces is one vectorised lookup, ``a.to(b)``, with ``-1`` where an item is absent from ``b``.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence

import numpy as np
import polars as pl

from errors import CatalogError


class ItemSpace:
    """An ordered set of item ids: position ``i`` holds ``ids[i]``."""

    def __init__(self, ids: Sequence, name: str = "items"):
        self.ids = list(ids)
        self.name = name
        self._row = {item_id: i for i, item_id in enumerate(self.ids)}
        if len(self._row) != len(self.ids):
            raise CatalogError(f"{name}: duplicate item ids")

    def __len__(self) -> int:
        return len(self.ids)

    def __contains__(self, item_id) -> bool:
        return item_id in self._row

    def row(self, item_id) -> int:
        """Position of one item id (``KeyError`` when absent)."""
        return self._row[item_id]

    def get(self, item_id, default: int = -1) -> int:
        """Position of one item id, or ``default`` when absent."""
        return self._row.get(item_id, default)

    def rows(self, item_ids: Iterable, missing: int = -1) -> np.ndarray:
        """``int64`` positions of ``item_ids``, ``missing`` where absent."""
        return np.fromiter((self._row.get(i, missing) for i in item_ids), dtype=np.int64)

    def to(self, other: ItemSpace) -> np.ndarray:
        """For each position of this space, the position of the same item in ``other`` (``-1`` if absent)."""
        return other.rows(self.ids)


def faiss_ids(item_ids: pl.Series | Sequence) -> np.ndarray:
    """Stable int64 FAISS ids: integer item ids are used as they are, strings get a 63-bit blake2b hash."""
    series = item_ids if isinstance(item_ids, pl.Series) else pl.Series(list(item_ids))
    if series.dtype.is_integer():
        return series.cast(pl.Int64).to_numpy()
    out = np.array([int.from_bytes(hashlib.blake2b(str(x).encode(), digest_size=8).digest(), "little") >> 1
                    for x in series.to_list()], dtype=np.int64)
    if len(np.unique(out)) != len(out):
        raise CatalogError("item id hash collision; rename one of the colliding item ids")
    return out
