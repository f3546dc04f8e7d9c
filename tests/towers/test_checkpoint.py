"""build_towers -> save_towers -> load_towers round trips, mismatches, and config schema checks."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from configs import Config, ConfigError, config_from_dict, load_config
from data.items import pad_batch
from data.rundir import RunDir
from towers.factory import (
    CheckpointError,
    build_towers,
    item_fingerprint,
    load_config_from_run,
    load_towers,
    save_towers,
)

NUM_IDS = 6


def _item_batch() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "text_input_ids": torch.randint(1000, 2000, (4, 9), generator=g),
        "text_attention_mask": torch.tensor([[1] * 9, [1] * 5 + [0] * 4, [1] * 7 + [0] * 2, [1] * 9]),
        "pixels": torch.randn(4, 3, 32, 32, generator=g),
        "image_mask": torch.tensor([True, False, True, True]),
        "waveforms": torch.randn(4, 8000, generator=g) * 0.1,
        "waveform_lengths": torch.tensor([8000, 6000, 8000, 4000]),
        "audio_mask": torch.tensor([True, True, False, False]),
        "id_index": torch.tensor([0, 5, -1, 2]),
    }


def _user_batch() -> tuple[torch.Tensor, torch.Tensor]:
    return pad_batch([[101, 2023, 3185, 2003, 102], [101, 2158, 102]], 0)


def _embeddings(model) -> tuple[torch.Tensor, torch.Tensor]:
    model.eval()
    with torch.no_grad():
        return model.item.encode_items(_item_batch()), model.user.encode_users(*_user_batch())


def _trained_like(config: Config):
    """Towers whose trainable weights differ from a fresh build (as after training)."""
    torch.manual_seed(0)
    model = build_towers(config, num_ids=NUM_IDS)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.05)
    return model


@pytest.mark.parametrize("overrides", [[], ["item.text.trainable=false", "user.strategy=frozen",
                                            "item.image.trainable=false"]],
                         ids=["all-trainable", "frozen-backbones"])
def test_save_load_round_trip(tmp_path: Path, overrides: list[str]) -> None:
    config = load_config("tiny", overrides)
    model = _trained_like(config)
    item_before, user_before = _embeddings(model)
    save_towers(model, tmp_path)

    loaded = load_towers(tmp_path)
    item_after, user_after = _embeddings(loaded)
    assert loaded.config == config
    assert loaded.item.num_ids == NUM_IDS
    torch.testing.assert_close(item_after, item_before, atol=1e-6, rtol=0)
    torch.testing.assert_close(user_after, user_before, atol=1e-6, rtol=0)
    assert item_fingerprint(loaded) == item_fingerprint(model)
    torch.testing.assert_close(loaded.logit_scale, model.logit_scale)

    with safe_open(str(tmp_path / RunDir.WEIGHTS), framework="pt") as f:
        keys = set(f.keys())
        assert f.metadata()["num_ids"] == str(NUM_IDS)
    frozen = [k for k in keys if k.startswith(("user.llm.", "item.text.backbone."))]
    if overrides:  # frozen pretrained backbones are reloaded from their reference, not stored
        assert frozen == []
        assert any(k.startswith("item.image.visual.") for k in keys)  # random-init image tower is stored
    else:
        assert frozen
    assert json.loads((tmp_path / RunDir.CONFIG).read_text()) == config.to_dict()


def test_fingerprint_tracks_item_weights_only() -> None:
    config = load_config("tiny")
    model = _trained_like(config)
    before = item_fingerprint(model)
    with torch.no_grad():
        model.user.head.net[-1].bias.add_(1.0)
    assert item_fingerprint(model) == before
    with torch.no_grad():
        model.item.fusion.gate["text"].bias.add_(1e-3)
    assert item_fingerprint(model) != before


def test_changed_dim_in_checkpoint_config_raises(tmp_path: Path) -> None:
    model = _trained_like(load_config("tiny"))
    save_towers(model, tmp_path)
    data = json.loads((tmp_path / RunDir.CONFIG).read_text())
    data["dim"] = 16
    (tmp_path / RunDir.CONFIG).write_text(json.dumps(data))
    with pytest.raises(CheckpointError, match="config expects"):
        load_towers(tmp_path)


def test_changed_architecture_in_checkpoint_config_raises(tmp_path: Path) -> None:
    model = _trained_like(load_config("tiny"))
    save_towers(model, tmp_path)
    data = json.loads((tmp_path / RunDir.CONFIG).read_text())
    data["item"]["audio"]["enabled"] = False  # the checkpoint still holds audio weights
    (tmp_path / RunDir.CONFIG).write_text(json.dumps(data))
    with pytest.raises(CheckpointError, match="unexpected"):
        load_towers(tmp_path)


def test_missing_checkpoint_files(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match=r"config\.json: not found; is .* a towerrec run directory"):
        load_towers(tmp_path)
    (tmp_path / RunDir.CONFIG).write_text(load_config("tiny").to_json())
    with pytest.raises(CheckpointError, match=f"{RunDir.WEIGHTS}: not found"):
        load_towers(tmp_path)


def test_unknown_key_in_run_config(tmp_path: Path) -> None:
    data = load_config("tiny").to_dict()
    data["train"]["bogus"] = 1
    (tmp_path / RunDir.CONFIG).write_text(json.dumps(data))
    with pytest.raises(CheckpointError, match=r"config.json: train: unknown key\(s\) \['bogus'\]"):
        load_config_from_run(tmp_path)


# --- config schema ----------------------------------------------------------------------------------------------


def test_config_unknown_keys() -> None:
    with pytest.raises(ConfigError, match=r"unknown key\(s\) \['bogus'\]"):
        config_from_dict({"bogus": 1})
    with pytest.raises(ConfigError, match=r"item\.text: unknown key\(s\) \['modle'\]"):
        config_from_dict({"item": {"text": {"modle": "x"}}})
    with pytest.raises(ConfigError, match=r"--set train\.bogus=1: train: unknown key\(s\) \['bogus'\]"):
        load_config("tiny", ["train.bogus=1"])
    with pytest.raises(ConfigError, match="no config 'no-such-setup'"):
        load_config("no-such-setup")


def test_overrides_are_type_checked() -> None:
    config = load_config("tiny", ["train.epochs=3", "train.lr=0.0005", "item.text.enabled=false",
                                  "index.factory=HNSW32", "rerank.weight=2"])
    assert config.train.epochs == 3 and isinstance(config.train.epochs, int)
    assert config.train.lr == 0.0005
    assert config.item.text.enabled is False
    assert config.index.factory == "HNSW32"
    assert config.rerank.weight == 2.0 and isinstance(config.rerank.weight, float)
    assert config.dim == 32 and config.name == "tiny"  # untouched fields keep the setup's values
    for bad, where in [("train.lr=abc", "train.lr"), ("train.epochs=3.5", "train.epochs"),
                       ("train.epochs=yes", "train.epochs"), ("dim=[32]", "dim"),
                       ("item.text.enabled=maybe", "item.text.enabled")]:
        with pytest.raises(ConfigError, match=where):
            load_config("tiny", [bad])
    with pytest.raises(ConfigError, match="must look like section.field=value"):
        load_config("tiny", ["train.lr"])
    with pytest.raises(ConfigError, match="'train' is not a section"):
        config_from_dict({"train": 5}, ["train.lr.x=1"])


def test_override_of_a_section_is_refused() -> None:
    with pytest.raises(ConfigError, match="train: expected a mapping"):
        load_config("tiny", ["train=3"])


def test_override_scientific_notation_float() -> None:
    assert load_config("tiny", ["train.lr=1e-4"]).train.lr == pytest.approx(1e-4)


def test_named_setups_load() -> None:
    for name in ("tiny", "offline", "hub"):
        config = load_config(name)
        assert isinstance(config, Config)
        assert config_from_dict(json.loads(config.to_json())) == config
