"""Config schema: shipped setups, Literal choices, device strings, numeric ranges, and where errors are blamed."""

from __future__ import annotations

import dataclasses
import json
import typing
from pathlib import Path

import pytest

from configs import (
    CONFIG_DIR,
    Config,
    ConfigError,
    FieldError,
    TrainConfig,
    config_from_dict,
    load_config,
)

SHIPPED = sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))


def _sections() -> list[type]:
    """Config and every dataclass nested in it."""
    out, todo = [], [Config]
    while todo:
        cls = todo.pop()
        out.append(cls)
        todo += [t for t in typing.get_type_hints(cls).values() if dataclasses.is_dataclass(t)]
    return out


@pytest.mark.parametrize("name", SHIPPED)
def test_every_shipped_config_loads(name: str) -> None:
    config = load_config(name)
    assert isinstance(config, Config) and config.name == name
    assert config_from_dict(json.loads(config.to_json())) == config  # what a run directory stores reloads
    assert load_config(CONFIG_DIR / f"{name}.yaml") == config


def test_shipped_setups_are_the_documented_ones() -> None:
    assert {"tiny", "offline", "hub"} <= set(SHIPPED)


def test_hub_setup_uses_a_pretrained_wav2vec2_bundle() -> None:
    import torchaudio.pipelines as pipelines

    audio = load_config("hub").item.audio
    assert audio.arch == "wav2vec2" and audio.pretrained == "WAV2VEC2_BASE" and not audio.trainable
    bundle = getattr(pipelines, audio.pretrained)  # exists in the pinned torchaudio (nothing is downloaded)
    assert isinstance(bundle, pipelines.Wav2Vec2Bundle) and int(bundle.sample_rate) == audio.sample_rate


# --- Literal choices and the device string ----------------------------------------------------------------------


@pytest.mark.parametrize("key,choices", [
    ("data.tie_break", ("auto", "item_id", "input_order")),
    ("user.pooling", ("last", "mean")),
    ("train.negatives", ("batch", "catalog")),
    ("item.audio.arch", ("conv", "wav2vec2")),
    ("item.fusion", ("gated", "mean")),
])
def test_literal_fields_accept_only_their_choices(key: str, choices: tuple[str, ...]) -> None:
    for choice in choices:
        config = load_config("tiny", [f"{key}={choice}"])
        node: typing.Any = config
        for part in key.split("."):
            node = getattr(node, part)
        assert node == choice
    listed = ", ".join(repr(c) for c in choices)
    for bad in ("bogus", "true", "1", "Mean"):
        with pytest.raises(ConfigError, match=f"{key}: must be one of {listed}; got "):
            load_config("tiny", [f"{key}={bad}"])


@pytest.mark.parametrize("device", ["auto", "cpu", "cuda", "cuda:0", "cuda:12", "mps"])
def test_valid_devices(device: str) -> None:
    assert load_config("tiny", [f"train.device={device}"]).train.device == device


@pytest.mark.parametrize("device", ["gpu", "CPU", "'cuda:'", "cuda:x", "cuda:-1", "cuda0", "tpu", "''"])
def test_invalid_devices(device: str) -> None:
    with pytest.raises(ConfigError, match=r"train\.device: must be 'auto', 'cpu', 'cuda', 'cuda:N' or 'mps', got"):
        load_config("tiny", [f"train.device={device}"])


# --- numeric ranges -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("override,message", [
    ("dim=0", "dim: must be >= 1, got 0"),
    ("dim=-32", "dim: must be >= 1, got -32"),
    ("train.epochs=0", "train.epochs: must be >= 1, got 0"),
    ("train.batch_size=0", "train.batch_size: must be >= 1, got 0"),
    ("train.lr=0", "train.lr: must be > 0, got 0.0"),
    ("train.lr=-1e-3", "train.lr: must be > 0, got -0.001"),
    ("train.lr=.inf", "train.lr: must be a finite number > 0, got inf"),
    ("train.temperature=0", "train.temperature: must be > 0, got 0.0"),
    ("train.weight_decay=-0.1", "train.weight_decay: must be >= 0, got -0.1"),
    ("train.patience=-1", "train.patience: must be >= 0, got -1"),
    ("train.eval_users=-5", "train.eval_users: must be >= 0, got -5"),
    ("train.windows=0", "train.windows: must be >= 1, got 0"),
    ("item.modality_dropout=1", "item.modality_dropout: must be in [0, 1), got 1.0"),
    ("item.modality_dropout=-0.1", "item.modality_dropout: must be in [0, 1), got -0.1"),
    ("item.image.image_size=0", "item.image.image_size: must be >= 1, got 0"),
    ("item.text.max_length=0", "item.text.max_length: must be >= 1, got 0"),
    ("item.audio.max_seconds=0", "item.audio.max_seconds: must be > 0, got 0.0"),
    ("item.audio.width=2", "item.audio.width: must be >= 4, got 2"),
    ("item.audio.sample_rate=0", "item.audio.sample_rate: must be >= 1000, got 0"),
    ("user.batch_size=0", "user.batch_size: must be >= 1, got 0"),
    ("user.head_hidden=-1", "user.head_hidden: must be >= 0, got -1"),
    ("rerank.candidates=0", "rerank.candidates: must be >= 1, got 0"),
    ("data.min_count=0", "data.min_count: must be >= 1, got 0"),
    ("data.profile_token_budget=0", "data.profile_token_budget: must be >= 1, got 0"),
    ("index.nprobe=0", "index.nprobe: must be >= 1, got 0"),
])
def test_out_of_range_values_are_refused(override: str, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config("tiny", [override])
    assert str(info.value) == f"--set {override}: {message}"


def test_boundary_values_are_accepted() -> None:
    config = load_config("tiny", ["train.patience=0", "train.weight_decay=0", "train.eval_users=0",
                                  "item.modality_dropout=0", "user.head_hidden=0", "user.layer=0",
                                  "train.max_positions=0", "data.profile_text_chars=0", "dim=1", "train.lr=1e-9"])
    assert config.dim == 1 and config.train.patience == 0 and config.item.modality_dropout == 0.0


def test_id_vectors_auto_follow_the_protocol() -> None:
    """The default's ``item.id_embedding: auto`` is resolved when the config is built: id vectors for warm and
    cold-users, none for cold-items (new items are ranked from content, like the known ones). An explicit value
    wins, and a bare item tower refuses an unresolved "auto"."""
    assert load_config("hllm").item.id_embedding is True
    assert load_config("hllm", ["data.protocol=cold-users"]).item.id_embedding is True
    assert load_config("hllm", ["data.protocol=cold-items"]).item.id_embedding is False
    assert load_config("hllm", ["data.protocol=cold-items", "item.id_embedding=true"]).item.id_embedding is True
    assert load_config("tiny", ["item.id_embedding=auto", "data.protocol=cold-items",
                                "user.input=items"]).item.id_embedding is False
    with pytest.raises(ConfigError, match="item.id_embedding: 'maybe' is not"):
        load_config("tiny", ["item.id_embedding=maybe"])
    from configs import ItemTowerConfig
    from towers.item import ItemTower

    with pytest.raises(ConfigError, match="resolved by configs.Config"):
        ItemTower(ItemTowerConfig(id_embedding="auto"), dim=8, num_ids=4)


def test_every_numeric_field_declares_its_range() -> None:
    """A new int or float field must come with a range (``_bounded``), so ``--set x=0`` is never silently taken."""
    unchecked = [f"{cls.__name__}.{f.name}" for cls in _sections() for f in dataclasses.fields(cls)
                 if typing.get_type_hints(cls)[f.name] in (int, float) and "check" not in f.metadata]
    assert unchecked == []


def test_configs_built_in_python_are_checked_too() -> None:
    with pytest.raises(FieldError, match=r"^lr: must be > 0, got 0$"):
        TrainConfig(lr=0)
    with pytest.raises(ConfigError, match="dim: must be >= 1, got 0"):
        dataclasses.replace(load_config("tiny"), dim=0)
    with pytest.raises(ConfigError, match="device: must be"):
        TrainConfig(device="gpu")


# --- where an error is blamed: the file, or the --set override --------------------------------------------------


def test_override_errors_name_the_override_not_the_shipped_file() -> None:
    cases = {
        "train.lr=abc": "--set train.lr=abc: train.lr: expected float, got str 'abc'",
        "train.bogus=1": "--set train.bogus=1: train: unknown key(s) ['bogus']",
        "train.lr": "--set train.lr: must look like section.field=value",
        "train.lr.x=1": "--set train.lr.x=1: 'lr' is not a section",
        "train.lr=[": "--set train.lr=[: cannot parse the value '[' as YAML",
    }
    for override, start in cases.items():
        with pytest.raises(ConfigError) as info:
            load_config("tiny", [override])
        assert str(info.value).startswith(start), str(info.value)
        assert "tiny.yaml" not in str(info.value)


def test_the_first_failing_override_is_blamed() -> None:
    with pytest.raises(ConfigError, match=r"^--set train\.epochs=0: train\.epochs: must be >= 1, got 0$"):
        load_config("tiny", ["train.lr=0.1", "train.epochs=0", "dim=16"])


def test_file_errors_name_the_file(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: bad\ndim: 0\n")
    with pytest.raises(ConfigError, match=f"^{bad}: dim: must be >= 1, got 0$"):
        load_config(bad)
    with pytest.raises(ConfigError, match=f"^{bad}: dim: must be >= 1"):  # an unrelated override: still the file
        load_config(bad, ["train.epochs=3"])
    bad.write_text("train:\n  negatives: everything\n")
    with pytest.raises(ConfigError, match=f"^{bad}: train.negatives: must be one of 'batch', 'catalog'"):
        load_config(bad)
    bad.write_text("train: [unclosed\n")
    with pytest.raises(ConfigError, match=f"^{bad}: not valid YAML"):
        load_config(bad)
    bad_json = tmp_path / "bad.json"
    bad_json.write_text('{"dim": 8,}')
    with pytest.raises(ConfigError, match=f"^{bad_json}: not valid JSON"):
        load_config(bad_json)


def test_an_override_may_repair_a_file(tmp_path: Path) -> None:
    path = tmp_path / "fixable.yaml"
    path.write_text("train:\n  lr: 0\n")
    assert load_config(path, ["train.lr=0.01"]).train.lr == 0.01


@pytest.mark.parametrize("field", ["resumable", "refit"])
def test_item_sequence_only_fields_refused_for_text_profiles(field: str) -> None:
    """Flags only the item-sequence loop acts on are refused where they would be accepted and ignored."""
    with pytest.raises(ConfigError, match=rf"train\.{field}.*user\.input='text'"):
        load_config("tiny", ["user.input=text", f"train.{field}=true"])
