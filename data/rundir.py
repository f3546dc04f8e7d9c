"""The run directory: the one place that knows the name of every file a run holds, and reads and writes them.

::

    <run>/
        config.json             the exact Config the towers were built with
        towers.safetensors      trainable tower weights (frozen pretrained backbones reload from their reference)
        metrics.json            training history, best epoch, validation and test figures
        curves.png              training loss and validation NDCG@10 per epoch
        catalog_ref.json        path and sha256 of the catalog the run was trained on
        histories.parquet       each training user's history (user_id, position, item_id), test item held out
        id_table.parquet        item ids of the item tower's id-vector rows, in row order
        rerank/                 fine-tuned LLM reranker (`towerrec train-rerank`), one per mode: <mode>.safetensors
                                (LoRA adapter weights) and <mode>.json (its settings, fusion weight, validation)
        index/
            LIVE                name of the version being served
            <version>/          index.faiss, items.parquet (faiss_id -> item_id, title, content hash, searchable),
                                vectors.npy (the item embeddings, read by an item-sequence user tower and by
                                reindex), embeddings/part-*.parquet (the export format), manifest.json
            .reindex-<plan>/    a reindex in progress: plan.json and its finished chunks (chunk-*.parquet),
                                removed once the new version is live

Training writes a new run into a temporary sibling folder and publishes it whole at the end, so an
interrupted run never leaves a half-written run directory (nor destroys the previous one).
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import polars as pl

from configs import Config, config_from_dict
from data.atomic import publish_dir, temp_dir, write_parquet, write_text
from data.catalog import Catalog, catalog_sha256, load_catalog
from data.ids import ItemSpace
from data.protocol import Split
from errors import CatalogError, CheckpointError, ConfigError

logger = logging.getLogger(__name__)


class RunDir:
    """A run directory (see the module docstring for its layout)."""

    CONFIG = "config.json"
    WEIGHTS = "towers.safetensors"
    METRICS = "metrics.json"
    CURVES = "curves.png"
    CATALOG_REF = "catalog_ref.json"
    HISTORIES = "histories.parquet"
    ID_TABLE = "id_table.parquet"
    RERANK = "rerank"  # folder of fine-tuned reranker adapters: <mode>.safetensors + <mode>.json
    INDEX = "index"
    # Inside index/: the live pointer, and the files of one version folder.
    LIVE = "LIVE"
    INDEX_FILE = "index.faiss"
    INDEX_ITEMS = "items.parquet"
    INDEX_VECTORS = "vectors.npy"  # (N, D) float32 item embeddings, index-table order (item-sequence user input)
    INDEX_EMBEDDINGS = "embeddings"  # folder of Parquet parts: the export format (item_id, vector, fingerprint, ...)
    MANIFEST = "manifest.json"
    # Inside index/: the work folder of a reindex in progress (one per plan), its plan and its chunks.
    REINDEX_WORK = ".reindex-"
    REINDEX_PLAN = "plan.json"
    REINDEX_CHUNK = "chunk-{:06d}.parquet"

    def __init__(self, path: str | Path):
        self.path = Path(path)

    def __repr__(self) -> str:
        return f"RunDir({str(self.path)!r})"

    # -- paths -----------------------------------------------------------------------------------------------
    @property
    def config_path(self) -> Path:
        return self.path / self.CONFIG

    @property
    def weights_path(self) -> Path:
        return self.path / self.WEIGHTS

    @property
    def metrics_path(self) -> Path:
        return self.path / self.METRICS

    @property
    def curves_path(self) -> Path:
        return self.path / self.CURVES

    @property
    def index_root(self) -> Path:
        return self.path / self.INDEX

    @property
    def resume_path(self) -> Path:
        """Resumable training state, kept beside the run (the run itself is published only when complete)."""
        return self.path.parent / f".{self.path.name}.resume.pt"

    def is_run(self) -> bool:
        """True when the folder holds a trained run (its config and weights)."""
        return self.config_path.is_file() and self.weights_path.is_file()

    def require(self) -> RunDir:
        """Raise a clear :class:`CheckpointError` unless this is a trained run; returns ``self``."""
        if not self.path.is_dir():
            raise CheckpointError(f"{self.path}: run directory not found (run `towerrec train` first)")
        for path in (self.config_path, self.weights_path):
            if not path.is_file():
                raise CheckpointError(f"{path}: not found; is {self.path} a towerrec run directory?")
        return self

    # -- creating a run ----------------------------------------------------------------------------------------
    def staging(self, overwrite: bool = False) -> RunDir:
        """A new empty run folder beside this one, to be published with :meth:`publish` when complete.

        Refuses to replace an existing run unless ``overwrite`` (its index versions would not match the new
        towers, so they go with it).
        """
        if self.path.exists() and not self.path.is_dir():
            raise CheckpointError(f"{self.path}: exists and is not a folder")
        if self.path.exists() and any(self.path.iterdir()) and not overwrite:
            what = "a towerrec run" if self.config_path.is_file() else "files"
            raise CheckpointError(f"{self.path} already holds {what}; choose another --run or pass --overwrite")
        return RunDir(temp_dir(self.path.parent, f".{self.path.name}-training-"))

    def publish(self, staged: RunDir) -> None:
        """Move a complete staged run into this folder's place (replacing what was there, all at once)."""
        publish_dir(staged.path, self.path)

    def discard(self) -> None:
        """Delete a staged run folder that will not be published."""
        shutil.rmtree(self.path, ignore_errors=True)

    # -- config ----------------------------------------------------------------------------------------------
    def write_config(self, config: Config) -> None:
        write_text(self.config_path, config.to_json())

    def read_config(self) -> Config:
        """The exact config the run was trained with."""
        if not self.config_path.is_file():
            raise CheckpointError(f"{self.config_path}: not found; is {self.path} a towerrec run directory?")
        try:
            data = json.loads(self.config_path.read_text())
        except (OSError, json.JSONDecodeError) as err:
            raise CheckpointError(f"{self.config_path}: unreadable ({err})") from None
        try:
            return config_from_dict(data)
        except ConfigError as err:
            raise CheckpointError(f"{self.config_path}: {err}") from None

    # -- metrics ---------------------------------------------------------------------------------------------
    def write_metrics(self, metrics: dict) -> None:
        write_text(self.metrics_path, json.dumps(metrics, indent=2))

    def read_metrics(self) -> dict:
        if not self.metrics_path.is_file():
            raise CheckpointError(f"{self.metrics_path}: not found")
        return _read_json(self.metrics_path)

    # -- the catalog the run was trained on ------------------------------------------------------------------
    def write_catalog_ref(self, catalog: Catalog) -> None:
        ref = {"path": str(Path(catalog.root).resolve()), "sha256": catalog_sha256(catalog.root)}
        write_text(self.path / self.CATALOG_REF, json.dumps(ref, indent=2))

    def catalog_ref(self) -> dict:
        """``{"path": ..., "sha256": ...}`` of the training catalog."""
        path = self.path / self.CATALOG_REF
        if not path.is_file():
            raise CheckpointError(f"{path}: not found; is {self.path} a towerrec run directory?")
        ref = _read_json(path)
        if not isinstance(ref, dict) or not {"path", "sha256"} <= set(ref):
            raise CheckpointError(f"{path}: expected the keys 'path' and 'sha256'")
        return ref

    def load_catalog(self, override: str | Path | None = None) -> Catalog:
        """The training catalog, from where it was (or from ``override``), refused if its content changed.

        A catalog re-prepared in place would silently change what is evaluated; a moved one is found again
        through ``override`` and accepted only if it is the same data (same sha256).
        """
        ref = self.catalog_ref()
        root = Path(override) if override is not None else Path(ref["path"])
        if not (root / "items.parquet").is_file():
            hint = "" if override is not None else " (moved or deleted?); give its new location with --catalog"
            raise CatalogError(f"{root}: the catalog run {self.path} was trained on is not there{hint}")
        digest = catalog_sha256(root)
        if digest != ref["sha256"]:
            raise CatalogError(
                f"{root}: catalog content changed since run {self.path} was trained on it (sha256 {digest[:12]}, "
                f"trained on {ref['sha256'][:12]}): it was re-prepared or edited. Retrain, or point --catalog at "
                "the original catalog"
            )
        return load_catalog(root)

    def catalog_changed(self) -> bool | None:
        """True when the training catalog is still at its recorded path but its content changed; None if absent."""
        ref = self.catalog_ref()
        root = Path(ref["path"])
        if not (root / "items.parquet").is_file():
            return None
        return catalog_sha256(root) != ref["sha256"]

    # -- serving histories and the id table ------------------------------------------------------------------
    def write_histories(self, split: Split) -> None:
        """Each split user's sequence without the held-out test item, in order."""
        users, items, order = [], [], []
        for u, seq in enumerate(split.sequences):
            for k, j in enumerate(seq[:-1]):
                users.append(split.user_ids[u])
                items.append(split.item_ids[int(j)])
                order.append(k)
        write_parquet(pl.DataFrame({"user_id": users, "position": order, "item_id": items}),
                      self.path / self.HISTORIES)

    def read_histories(self) -> dict:
        """``{user_id: [item_id, ...]}``, oldest first."""
        path = self.path / self.HISTORIES
        if not path.is_file():
            raise CheckpointError(f"{path}: not found; is {self.path} a complete run directory?")
        hist = _read_parquet(path).sort(["user_id", "position"])
        grouped = hist.group_by("user_id", maintain_order=True).agg(pl.col("item_id"))
        return dict(zip(grouped["user_id"].to_list(), grouped["item_id"].to_list()))

    def write_id_table(self, item_ids: list) -> None:
        """The item ids whose id vectors the item tower learned, in id-table row order."""
        write_parquet(pl.DataFrame({"item_id": item_ids}), self.path / self.ID_TABLE)

    def read_id_table(self) -> ItemSpace:
        path = self.path / self.ID_TABLE
        if not path.is_file():
            raise CheckpointError(f"{path}: not found; is {self.path} a complete run directory?")
        return ItemSpace(_read_parquet(path)["item_id"].to_list(), name="id table")


def _read_json(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{path}: unreadable ({err})") from None


def _read_parquet(path: Path) -> pl.DataFrame:
    try:
        return pl.read_parquet(path)
    except (OSError, pl.exceptions.PolarsError) as err:
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise CheckpointError(f"{path}: unreadable ({reason})") from None
