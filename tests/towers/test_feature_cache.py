"""Frozen text features are encoded once per catalog and encoder, then read from the disk cache."""

from __future__ import annotations

from pathlib import Path

import torch

from configs import load_config
from data.catalog import load_catalog
from towers import feature_cache
from towers.factory import build_towers, make_item_dataset


def test_text_features_are_cached_and_keyed_on_texts_and_weights(tiny_catalog: Path, tmp_path: Path,
                                                                 monkeypatch) -> None:
    monkeypatch.setattr(feature_cache, "cache_dir", lambda: tmp_path)
    model = build_towers(load_config("tiny", ["item.text.trainable=false"])).eval()
    dataset = make_item_dataset(load_catalog(tiny_catalog), model)
    first = feature_cache.text_features(model, dataset, torch.device("cpu"), progress=False)
    files = list((tmp_path / "features").glob("text-*.safetensors"))
    assert first.shape == (len(dataset), model.item.text.feature_dim) and len(files) == 1

    calls = {"n": 0}
    real = model.item.text.forward

    def counting(*args, **kwargs):
        calls["n"] += 1
        return real(*args, **kwargs)

    monkeypatch.setattr(model.item.text, "forward", counting)
    again = feature_cache.text_features(model, dataset, torch.device("cpu"), progress=False)
    assert calls["n"] == 0 and torch.equal(again, first)  # read back, not recomputed

    # the same features as encoding directly
    batch = next(iter(feature_cache.item_loader(dataset, batch_size=8, text_only=True)))
    with torch.no_grad():
        direct = real(batch["text_input_ids"], batch["text_attention_mask"])
    torch.testing.assert_close(first[:8], direct, atol=1e-5, rtol=1e-4)

    # other texts or other weights: a new entry
    dataset.texts = [t + " (remastered)" for t in dataset.texts]
    feature_cache.text_features(model, dataset, torch.device("cpu"), progress=False)
    with torch.no_grad():
        next(model.item.text.parameters()).add_(0.01)
    feature_cache.text_features(model, dataset, torch.device("cpu"), progress=False)
    assert len(list((tmp_path / "features").glob("text-*.safetensors"))) == 3


def test_a_cache_miss_leaves_the_global_random_state_as_a_hit_does(tiny_catalog: Path, tmp_path: Path,
                                                                  monkeypatch) -> None:
    # training seeds once, then encodes (or reads) the features, then draws its initial weights and batches:
    # the first run on a catalog must train exactly like every later one
    monkeypatch.setattr(feature_cache, "cache_dir", lambda: tmp_path)
    model = build_towers(load_config("tiny", ["item.text.trainable=false"])).eval()
    dataset = make_item_dataset(load_catalog(tiny_catalog), model)
    draws = []
    for _ in range(2):  # a miss, then a hit
        torch.manual_seed(0)
        feature_cache.text_features(model, dataset, torch.device("cpu"), progress=False)
        draws.append(torch.rand(4))
    torch.manual_seed(0)
    assert torch.equal(draws[0], draws[1]) and torch.equal(draws[0], torch.rand(4))
