"""towerrec's one error hierarchy: every kind of bad input has its own subclass of :class:`TowerrecError`.

The CLI catches :class:`TowerrecError` alone and prints its message as one line (exit code 2). Anything else
that escapes is a bug and keeps its traceback. Messages name the file, row, field or argument at fault.

The subclasses also derive from the built-in exception a caller would naturally expect (``ValueError`` for
bad values, ``RuntimeError`` for bad state), so ``except ValueError`` keeps working in user code.
"""

from __future__ import annotations


class TowerrecError(Exception):
    """Base class of every error caused by input (data, config, query, files on disk), not by a bug."""


class ConfigError(TowerrecError, ValueError):
    """A config file or ``--set`` override that does not match the schema."""


class CatalogError(TowerrecError, ValueError):
    """A bad catalog or source table. The message names the file, the row (1-based, header excluded) and field."""


class MediaError(TowerrecError, ValueError):
    """A media file that is missing, outside the catalog folder, truncated or not decodable."""


class QueryError(TowerrecError, ValueError):
    """A query that cannot be answered: unknown or mistyped id, empty history, bad ``k``."""


class IndexStateError(TowerrecError, RuntimeError):
    """An index that is missing, corrupt, built for other towers, or cannot be built as asked."""


class CheckpointError(TowerrecError, RuntimeError):
    """A run directory whose files are missing, truncated or do not match its config."""


class ModelLoadError(TowerrecError, RuntimeError):
    """A model reference that cannot be resolved to loadable weights."""


class DeviceError(TowerrecError, RuntimeError):
    """A device that was asked for but is not available (CUDA is never replaced by the CPU silently)."""


__all__ = [
    "TowerrecError", "ConfigError", "CatalogError", "MediaError", "QueryError", "IndexStateError",
    "CheckpointError", "ModelLoadError", "DeviceError",
]
