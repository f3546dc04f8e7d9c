"""Item titles and poster files for the page, read from a catalog folder (images only, confined to it)."""

from __future__ import annotations

import logging
from pathlib import Path

import polars as pl

from data.catalog import ITEMS_FILE, confined_media_path
from data.ids import id_forms
from data.rundir import RunDir
from errors import TowerrecError

logger = logging.getLogger(__name__)


class CatalogMedia:
    """``item_id -> (title, image path)`` of a catalog; an absent catalog simply has no images.

    Only ``item_id``, ``title`` and ``image_path`` are read. Image paths are confined to the catalog folder
    when a file is asked for (no absolute paths, no ``..``, no symlink out of the folder), as the engine does
    for training, so a hand-edited catalog cannot make the server hand out other files.
    """

    def __init__(self, root: str | Path | None):
        self.root = Path(root) if root is not None else None
        self.titles: dict = {}
        self.images: dict = {}
        if self.root is None:
            return
        path = self.root / ITEMS_FILE
        try:
            cols = pl.read_parquet_schema(path)
            table = pl.read_parquet(path, columns=[c for c in ("item_id", "title", "image_path") if c in cols])
        except (OSError, pl.exceptions.PolarsError) as err:
            logger.warning("%s: unreadable (%s); the page shows no posters", path, str(err).splitlines()[0])
            self.root = None
            return
        ids = table["item_id"].to_list()
        if "title" in table.columns:
            self.titles = dict(zip(ids, table["title"].to_list()))
        if "image_path" in table.columns:
            self.images = {i: p for i, p in zip(ids, table["image_path"].to_list()) if p}

    @classmethod
    def for_run(cls, run_dir: str | Path, catalog_dir: str | Path | None = None) -> CatalogMedia:
        """The catalog given, else the one the run was trained on (where it still is), else an empty one."""
        if catalog_dir is not None:
            return cls(catalog_dir)
        try:
            root = Path(RunDir(run_dir).catalog_ref()["path"])
        except TowerrecError as err:
            logger.warning("no catalog for posters (%s)", err)
            return cls(None)
        if not (root / ITEMS_FILE).is_file():
            logger.warning("the run's catalog %s is gone; the page shows no posters (pass --catalog)", root)
            return cls(None)
        return cls(root)

    def key(self, item_id):
        """The catalog's own form of ``item_id`` (``"42"`` finds integer item 42), or ``None`` if unknown."""
        for form in id_forms(item_id):
            if form in self.titles or form in self.images:
                return form
        return None

    def image_file(self, item_id) -> Path | None:
        """The item's image file, or ``None`` (no image, file missing, or a path outside the catalog)."""
        key = self.key(item_id)
        rel = self.images.get(key) if key is not None else None
        if rel is None or self.root is None:
            return None
        try:
            path = confined_media_path(self.root, rel, where=str(self.root / ITEMS_FILE))
        except TowerrecError as err:
            logger.warning("item %r: %s", item_id, err)
            return None
        return path if path.is_file() else None

    def has_image(self, item_id) -> bool:
        """Whether the catalog names an image for the item (the file itself is checked when served)."""
        key = self.key(item_id)
        return key is not None and key in self.images


