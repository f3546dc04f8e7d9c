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
        tombstones.json         salted hashes of the users erased from the run and its catalog (data.tombstones)
        rerank/                 fine-tuned LLM reranker (`towerrec train-rerank`), one per mode: <mode>.safetensors
                                (LoRA adapter weights) and <mode>.json (its settings, fusion weight, validation)
        index/
            LIVE                name of the version being served
            <version>/          index.faiss, items.parquet (faiss_id -> item_id, title, content hash, searchable),
                                vectors.npy (the item embeddings, read by an item-sequence user tower and by
                                reindex), embeddings/part-*.parquet (the export format), manifest.json
            .reindex-<plan>/    a reindex in progress: plan.json and its finished chunks (chunk-*.parquet),
                                removed once the new version is live

Training writes a new run into a temporary sibling folder (``.<run>-training-*``) and publishes it whole at the
end, so an interrupted run never leaves a half-written run directory (nor destroys the previous one). The staging
folder holds an owner record (``.owner.json``: host, pid, the process's start time and the boot id, which together
survive pid reuse) until it is published; the next training on the same path removes the staging folders whose
owner process is gone (a SIGKILL leaves one behind), and leaves those of a live process, or of another host, alone.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import socket
import time
from pathlib import Path
from typing import TYPE_CHECKING

import polars as pl

from configs import Config, config_from_dict
from data.atomic import publish_dir, temp_dir, write_parquet, write_text
from data.catalog import Catalog, catalog_sha256, load_catalog
from data.ids import ItemSpace
from data.tombstones import TOMBSTONES_FILE, Tombstones
from errors import CatalogError, CheckpointError, ConfigError

if TYPE_CHECKING:  # data.protocol imports torch; a run's paths and files are read without it
    from data.protocol import Split

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
    TOMBSTONES = TOMBSTONES_FILE
    RERANK = "rerank"  # folder of fine-tuned reranker adapters: <mode>.safetensors + <mode>.json
    INDEX = "index"
    # Inside index/: the live pointer, and the files of one version folder.
    LIVE = "LIVE"
    INDEX_FILE = "index.faiss"
    INDEX_ITEMS = "items.parquet"
    INDEX_VECTORS = "vectors.npy"  # (N, D) float32 item embeddings, index-table order (item-sequence user input)
    INDEX_EMBEDDINGS = "embeddings"  # folder of Parquet parts: the export format (item_id, vector, fingerprint, ...)
    MANIFEST = "manifest.json"
    INDEX_TUNING = "search.json"  # the auto-tuned search knobs and the recall they reached (index.tuning)
    # Inside index/: the work folder of a reindex in progress (one per plan), its plan and its chunks.
    REINDEX_WORK = ".reindex-"
    REINDEX_PLAN = "plan.json"
    REINDEX_CHUNK = "chunk-{:06d}.parquet"
    # Inside a staging folder until it is published: the training process that writes it (see owner_record).
    OWNER = ".owner.json"
    STAGING = "-training-"  # a staging folder is named .<run name>-training-<random>
    # A staging folder without an owner record (its owner died between creating it and recording itself, or
    # between dropping the record and publishing: instants) is removed once it is this old and holds run files only.
    UNOWNED_STALE_S = 24 * 3600

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
    def check_replaceable(self, overwrite: bool = False) -> None:
        """Raise a :class:`CheckpointError` unless a run may be published at this path.

        Absent, or an empty folder: yes. A towerrec run (its ``config.json`` is a towerrec config, of this or an
        earlier version): only with ``overwrite`` (its index versions would not match the new towers, so the
        whole folder goes). Anything else (a file, a symbolic link, a folder of other files) is never replaced,
        ``overwrite`` or not.
        """
        if self.path.is_symlink():
            raise CheckpointError(f"{self.path}: is a symbolic link; give the folder it points to as --run")
        if not self.path.exists():
            return
        if not self.path.is_dir():
            raise CheckpointError(f"{self.path}: exists and is not a folder")
        if not any(self.path.iterdir()):
            return
        if not self._holds_run_config():
            raise CheckpointError(f"{self.path} already holds files and is no towerrec run (no {self.CONFIG} of a "
                                  "towerrec config); it is never replaced, even with --overwrite: choose another --run")
        if not overwrite:
            raise CheckpointError(f"{self.path} already holds a towerrec run; choose another --run or pass --overwrite")

    def _holds_run_config(self) -> bool:
        """True when ``config.json`` is a towerrec config (a JSON object with its sections), of any version."""
        try:
            data = json.loads(self.config_path.read_text())
        except (OSError, UnicodeDecodeError, ValueError):
            return False
        return isinstance(data, dict) and {"user", "item", "train"} <= set(data)

    def staging(self, overwrite: bool = False) -> RunDir:
        """A new empty run folder beside this one, to be published with :meth:`publish` when complete.

        Refuses a path that may not be replaced (:meth:`check_replaceable`) before creating anything. Removes the
        staging folders of earlier trainings on this path whose owner process is gone (:meth:`sweep_staging`),
        then records this process as the new folder's owner.
        """
        self.check_replaceable(overwrite)
        self.sweep_staging()
        staged = RunDir(temp_dir(self.path.parent, f".{self.path.name}{self.STAGING}"))
        write_text(staged.path / self.OWNER, json.dumps(owner_record()))
        return staged

    def publish(self, staged: RunDir, overwrite: bool = False) -> None:
        """Move a complete staged run into this folder's place (replacing what was there, all at once).

        The path is checked again (:meth:`check_replaceable`): something may have appeared there while training.
        """
        self.check_replaceable(overwrite)
        (staged.path / self.OWNER).unlink(missing_ok=True)
        publish_dir(staged.path, self.path)

    def discard(self) -> None:
        """Delete a staged run folder that will not be published."""
        shutil.rmtree(self.path, ignore_errors=True)

    def sweep_staging(self, now: float | None = None) -> list[Path]:
        """Remove the abandoned staging folders of trainings on this path; returns the removed folders.

        A staging folder is abandoned when its owner record names a process of this host that is gone (or
        whose pid now belongs to another process: the start time differs, or the machine rebooted). One without
        a readable record is removed only when older than ``UNOWNED_STALE_S`` and holding nothing but run
        files. A live owner's folder, another host's (which cannot be checked from here), symbolic links and
        anything else are left alone.
        """
        now = time.time() if now is None else now
        removed = []
        if not self.path.parent.is_dir():
            return removed
        known = {self.OWNER, self.CONFIG, self.WEIGHTS, self.METRICS, self.CURVES, self.CATALOG_REF,
                 self.HISTORIES, self.ID_TABLE, self.TOMBSTONES}
        for folder in sorted(self.path.parent.glob(f".{self.path.name}{self.STAGING}*")):
            if folder.is_symlink() or not folder.is_dir():
                continue
            try:
                record = json.loads((folder / self.OWNER).read_text())
                alive = owner_alive(record)
            except (OSError, UnicodeDecodeError, ValueError, TypeError, KeyError, AttributeError):
                try:
                    names = {p.name for p in folder.iterdir()}
                    old = now - folder.stat().st_mtime > self.UNOWNED_STALE_S
                except OSError:
                    continue
                if not old or not all(n in known or n.endswith(".tmp") for n in names):
                    continue
                alive = False
            if alive is False:
                shutil.rmtree(folder, ignore_errors=True)
                logger.info("removed %s: staging folder of an interrupted training", folder)
                removed.append(folder)
        return removed

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
        through ``override`` and accepted only if it is the same data (same sha256). The users erased from the
        run (its ``tombstones.json``) are dropped, as the catalog's own erased users are.
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
        return load_catalog(root, Tombstones.of(self.path))

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


def _process_start(pid: int) -> str | None:
    """Start time of process ``pid`` (clock ticks after boot, /proc/<pid>/stat field 22); None where unknown."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2:].split()  # the command name, in parentheses, may hold spaces
    return fields[19] if len(fields) > 19 else None


def _boot_id() -> str | None:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return None


def owner_record() -> dict:
    """Who owns a staging folder: this host, this process's pid, its start time and the boot id."""
    pid = os.getpid()
    return {"host": socket.gethostname(), "pid": pid, "start": _process_start(pid), "boot": _boot_id()}


def owner_alive(record: dict) -> bool | None:
    """Whether the process an :func:`owner_record` names still runs: True, False, or None (another host).

    A pid alone is not enough (pids are reused): a recorded start time or boot id that differs from the
    running process's means the owner is gone. Where /proc is absent the pid alone decides.
    """
    if record["host"] != socket.gethostname():
        return None
    pid = int(record["pid"])
    if pid <= 0:
        raise ValueError(f"not a process id: {pid}")
    if record.get("boot") is not None and _boot_id() is not None and record["boot"] != _boot_id():
        return False
    start = _process_start(pid)
    if start is not None:
        return record.get("start") is None or record["start"] == start
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    except OSError:
        return False
    return True


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
