"""Item id spaces and the maps between them.

An item is addressed four ways: by its row in the catalog's items table, by its dense index in the
leave-one-out split, by its row in the item tower's id table (the split items at training time) and by its
FAISS id in an index. Each space is an :class:`ItemSpace` (an ordered list of the user's item ids); moving
between two spaces is one vectorised lookup, ``a.to(b)``, with ``-1`` where an item is absent from ``b``.
"""

from __future__ import annotations

import hashlib
import numbers
from collections.abc import Iterable, Sequence

import numpy as np
import polars as pl

from errors import CatalogError

MAX_INT_DIGITS = 20  # a longer digit string names no int64 id; it is not parsed (int() refuses over 4300 digits)


def as_int(value) -> int | None:
    """``value`` as an int if it is an int or a canonical ASCII integer string (``"42"``; not ``"042"``, ``"4.0"``,
    ``"²"`` or ``"١٢"``), else None. Bools are not ints here."""
    if isinstance(value, bool):
        return None
    if isinstance(value, numbers.Integral):
        return int(value)
    text = str(value).strip()
    digits = text.removeprefix("-")  # isdigit() also takes "²"; int() of thousands of digits is refused
    if digits.isascii() and digits.isdigit() and len(digits) <= MAX_INT_DIGITS and str(int(text)) == text:
        return int(text)
    return None


def id_forms(item_id) -> list:
    """The forms an id may take in a table: as given, as an int (``"42"`` -> 42, see :func:`as_int`) and as a
    string (42 -> ``"42"``)."""
    forms = [item_id]
    if isinstance(item_id, str):
        number = as_int(item_id)
        if number is not None:
            forms.append(number)
    elif isinstance(item_id, int) and not isinstance(item_id, bool):
        forms.append(str(item_id))
    return forms


def normalise_ids(col: pl.Series) -> pl.Series:
    """Integer ids stay integers (int64; uint64 ids beyond its range become strings); anything else a string."""
    if col.dtype.is_integer():
        ints = col.cast(pl.Int64, strict=False)
        if ints.null_count() == col.null_count():
            return ints
    text = col.cast(pl.Utf8)
    text = text.set((text.str.strip_chars() == "").fill_null(False), None)  # a blank id is an empty field
    canonical_ints = text.drop_nulls().str.contains(r"^(0|-?[1-9][0-9]{0,17})$").all()
    if len(text.drop_nulls()) and canonical_ints:
        return text.cast(pl.Int64)
    return text  # string ids stay strings, so "007" keeps its zeros


def as_item_ids(col: pl.Series, dtype: pl.DataType) -> pl.Series:
    """An interactions table's ``item_id`` column in the items table's id ``dtype``; null where it cannot be."""
    if col.dtype.is_float() and dtype.is_integer():  # integer ids stored as floats (a column with gaps in pandas)
        whole = (col.is_finite() & (col == col.floor())).fill_null(False)
        return col.set(~whole, None).cast(dtype, strict=False)
    ids = normalise_ids(col)
    return ids if ids.dtype == dtype else ids.cast(pl.Utf8).cast(dtype, strict=False)


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
