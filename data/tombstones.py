"""Tombstones: the users an operator erased (``towerrec forget``), kept so that they never come back.

A catalog folder and a run folder may each hold ``tombstones.json``::

    {"salt": "<32 hex digits>", "users": {"<salt>": ["<sha256 hex>", ...], ...}}

Each entry is ``sha256(salt || "\\0" || str(user_id))``: the list can say whether an id was erased without
holding the id itself. A file draws its own salt once (:func:`secrets.token_hex`) for the users erased into it,
so a list cannot be matched against a dictionary of likely ids computed in advance; entries carried over from
another list (a run inherits its catalog's) keep the salt they were made with. An integer id and its decimal string (``7`` and ``"7"``) are the same user here, as an import that
reads the id from text would make them.

Who honours them: :func:`data.catalog.load_catalog` drops a catalog's tombstoned users' interactions on every
load, ``prepare --overwrite`` carries the list of the catalog it replaces (and ``prepare --tombstones FILE``
applies a list to a new catalog), ``train --resume-from RUN`` and ``reindex`` apply the run's list to the
catalog they read, and a trained run inherits its catalog's list.
"""

from __future__ import annotations

import hashlib
import json
import secrets
from pathlib import Path

import polars as pl

from data.atomic import write_text
from errors import CatalogError

TOMBSTONES_FILE = "tombstones.json"


class Tombstones:
    """A salted-hash set of erased user ids (see the module docstring)."""

    def __init__(self, salt: str | None = None, users: dict[str, set[str]] | None = None):
        self.salt = salt or secrets.token_hex(16)
        self.users = {s: set(h) for s, h in (users or {}).items() if h}

    def __len__(self) -> int:
        return sum(len(h) for h in self.users.values())

    @staticmethod
    def digest(salt: str, user_id) -> str:
        return hashlib.sha256(f"{salt}\0{user_id}".encode()).hexdigest()

    def __contains__(self, user_id) -> bool:
        return any(self.digest(salt, user_id) in hashes for salt, hashes in self.users.items())

    def add(self, user_id) -> None:
        if user_id not in self:
            self.users.setdefault(self.salt, set()).add(self.digest(self.salt, user_id))

    def update(self, other: Tombstones) -> Tombstones:
        """Take every entry of ``other`` too (each keeps its salt); returns ``self``."""
        for salt, hashes in other.users.items():
            self.users.setdefault(salt, set()).update(hashes)
        return self

    def mask(self, user_ids: pl.Series) -> pl.Series:
        """True for each row of ``user_ids`` whose user is tombstoned (each distinct id is hashed once)."""
        if not self.users:
            return pl.Series(user_ids.name, [False] * len(user_ids), dtype=pl.Boolean)
        gone = [u for u in user_ids.unique().to_list() if u in self]
        return user_ids.is_in(pl.Series(gone, dtype=user_ids.dtype).implode())

    def drop_users(self, interactions: pl.DataFrame) -> tuple[pl.DataFrame, int]:
        """``interactions`` without the tombstoned users' rows, and how many rows went."""
        if not self.users:
            return interactions, 0
        gone = self.mask(interactions["user_id"])
        return interactions.filter(~gone), int(gone.sum())

    # -- files ----------------------------------------------------------------------------------------------
    @classmethod
    def read(cls, path: str | Path) -> Tombstones:
        """The list in ``path``, or an empty one (with a new salt) when there is no file."""
        path = Path(path)
        if not path.is_file():
            return cls()
        try:
            data = json.loads(path.read_text())
            salt, users = data["salt"], data["users"]
            if not isinstance(salt, str) or not salt or not isinstance(users, dict) or not all(
                    isinstance(s, str) and isinstance(h, list) and all(isinstance(x, str) for x in h)
                    for s, h in users.items()):
                raise TypeError("expected 'salt' (a string) and 'users' (salt -> list of hashes)")
        except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError) as err:
            raise CatalogError(f"{path}: unreadable tombstone list ({err}); it is never ignored: restore it from "
                               "a backup") from None
        return cls(salt, users)

    @classmethod
    def of(cls, folder: str | Path) -> Tombstones:
        """The list a catalog or run folder holds (empty when it holds none)."""
        return cls.read(Path(folder) / TOMBSTONES_FILE)

    def write(self, folder: str | Path) -> None:
        """Write ``folder/tombstones.json`` atomically (nothing when the list is empty)."""
        if self.users:
            write_text(Path(folder) / TOMBSTONES_FILE,
                       json.dumps({"salt": self.salt, "users": {s: sorted(h) for s, h in self.users.items()}},
                                  indent=1))
