"""Audio encoder: masked batch norm in training, frozen encoders, pretrained torchaudio bundles (never downloaded)."""

from __future__ import annotations

import copy
import dataclasses
import math
import urllib.error
from pathlib import Path

import pytest
import torch
import torchaudio
from torch import nn

from configs import AudioEncoderConfig, ConfigError, load_config
from errors import ModelLoadError
from towers.audio import AudioEncoder, MaskedBatchNorm2d, wav2vec2_bundles

SR = 16000


def _clip(seconds: float, freq: float, seed: int) -> torch.Tensor:
    """A seeded tone plus noise: ``(seconds * SR,)``."""
    g = torch.Generator().manual_seed(seed)
    t = torch.arange(int(seconds * SR)) / SR
    return 0.5 * torch.sin(2 * math.pi * freq * t) + 0.05 * torch.randn(t.shape, generator=g)


def _pad(clips: list[torch.Tensor], length: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Zero-pad clips to ``length`` samples (default: the longest clip), with their true lengths."""
    length = length or max(len(c) for c in clips)
    waves = torch.zeros(len(clips), length)
    for i, c in enumerate(clips):
        waves[i, : len(c)] = c
    return waves, torch.tensor([len(c) for c in clips])


def _bn_state(enc: AudioEncoder) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in enc.state_dict().items() if "running" in k or "num_batches" in k}


@pytest.fixture(autouse=True)
def no_download(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No test here may reach the network: an empty torch hub cache, and every download fails as offline."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))

    def offline(url: str, *args, **kwargs) -> None:
        raise urllib.error.URLError(f"network blocked in tests: {url}")

    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)


# --- masked batch norm ----------------------------------------------------------------------------------------


def test_masked_batchnorm_uses_only_valid_frames() -> None:
    torch.manual_seed(0)
    x = torch.randn(3, 4, 5, 9) * 2 + 1  # (B, C, M, T)
    frames = torch.tensor([9, 4, 2])
    valid = torch.arange(9)[None, :] < frames[:, None]
    x[~valid[:, None, None, :].expand_as(x)] = 7.0  # garbage in the padding must not matter
    masked, plain = MaskedBatchNorm2d(4, momentum=0.3), nn.BatchNorm2d(4, momentum=0.3)
    with torch.no_grad():
        masked.weight.uniform_(0.5, 1.5)
        masked.bias.uniform_(-1, 1)
    plain.load_state_dict(masked.state_dict())
    # Reference: ordinary batch norm over the valid frames alone, laid side by side as one long clip.
    joined = torch.cat([x[i:i + 1, :, :, : int(n)] for i, n in enumerate(frames)], dim=3)  # (1, C, M, 15)
    want = plain(joined)
    got = masked(x, valid)
    got_joined = torch.cat([got[i:i + 1, :, :, : int(n)] for i, n in enumerate(frames)], dim=3)
    torch.testing.assert_close(got_joined, want, atol=1e-5, rtol=1e-5)
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        torch.testing.assert_close(getattr(masked, name), getattr(plain, name), atol=1e-6, rtol=1e-5)


def test_masked_batchnorm_is_batchnorm_in_eval_and_without_mask() -> None:
    torch.manual_seed(0)
    x = torch.randn(2, 3, 4, 6)
    masked, plain = MaskedBatchNorm2d(3), nn.BatchNorm2d(3)
    assert list(masked.state_dict()) == list(plain.state_dict())  # checkpoint keys are unchanged
    torch.testing.assert_close(masked(x), plain(x))  # training, no mask: batch norm itself
    masked.eval()
    plain.eval()
    valid = torch.tensor([[True] * 6, [True] * 2 + [False] * 4])
    torch.testing.assert_close(masked(x, valid), plain(x))  # eval: running statistics, mask irrelevant


def test_conv_encoder_checkpoint_keys_are_those_of_batchnorm() -> None:
    enc = AudioEncoder(AudioEncoderConfig(arch="conv", width=16))
    keys = {k for k in enc.state_dict() if k.startswith("blocks.")}
    want = {f"blocks.{b}.0.{p}" for b in range(3) for p in ("weight", "bias")} | {
        f"blocks.{b}.1.{p}" for b in range(3)
        for p in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")}
    assert keys == want


# Extra zeros after the longest clip change nothing either (the encoder cuts every clip to its length first).
@pytest.mark.parametrize("lengths,pad_to", [
    ((0.3, 1.5), 4.5),  # a short clip batched with a much longer one, padded to 3x the longest
    ((0.25,), 2.5),  # one short clip, padded to 10x its length
])
def test_train_mode_features_and_running_stats_ignore_padding(lengths: tuple[float, ...], pad_to: float) -> None:
    torch.manual_seed(0)
    enc = AudioEncoder(AudioEncoderConfig(arch="conv", width=16, max_seconds=5.0)).train()
    other = copy.deepcopy(enc)
    clips = [_clip(s, 220 * (i + 1), seed=i) for i, s in enumerate(lengths)]
    tight = enc(*_pad(clips))
    loose = other(*_pad(clips, int(pad_to * SR)))
    torch.testing.assert_close(loose, tight, atol=1e-5, rtol=1e-4)
    for key, value in _bn_state(enc).items():
        torch.testing.assert_close(_bn_state(other)[key], value, atol=1e-6, rtol=1e-5, msg=key)
    assert int(enc.blocks[0][1].num_batches_tracked) == 1  # the statistics really were updated


def test_train_mode_short_clip_next_to_a_long_one_is_normalised_as_if_unpadded() -> None:
    """In a training batch, a short clip padded to a 6x longer one gets exactly the features (and the batch-norm
    running statistics) of a reference that never pads: each clip convolved on its own real frames, with batch
    statistics pooled over those frames only."""
    torch.manual_seed(0)
    enc = AudioEncoder(AudioEncoderConfig(arch="conv", width=16, max_seconds=5.0)).train()
    ref = copy.deepcopy(enc)
    clips = [_clip(0.25, 330, 0), _clip(1.5, 440, 1)]
    captured = []
    enc.blocks[0][0].register_forward_pre_hook(lambda module, args: captured.append(args[0].detach()))
    got = enc(*_pad(clips))

    # The reference starts from the encoder's own per-clip log-mels, cut to each clip's real frames.
    mels = [captured[0][i:i + 1, :, :, : 1 + len(c) // enc.hop] for i, c in enumerate(clips)]  # (1, 1, M, T_i)
    assert mels[1].shape[-1] > 5 * mels[0].shape[-1]
    with torch.no_grad():
        xs = mels
        for conv, norm, act in ref.blocks:
            ys = [conv(x) for x in xs]  # (1, C, M', T_i'): the conv's own zero padding, no batch padding
            flat = torch.cat([y.transpose(0, 1).flatten(1) for y in ys], 1)  # (C, N): every real value
            mean, var = flat.mean(1), flat.var(1, unbiased=False)
            m = norm.momentum
            norm.running_mean.mul_(1 - m).add_(m * mean)
            norm.running_var.mul_(1 - m).add_(m * flat.var(1, unbiased=True))
            norm.num_batches_tracked.add_(1)
            shape = (1, -1, 1, 1)
            xs = [act((y - mean.view(shape)) / torch.sqrt(var.view(shape) + norm.eps) * norm.weight.view(shape)
                      + norm.bias.view(shape)) for y in ys]
        want = torch.cat([x.mean(dim=(2, 3)) for x in xs])  # (B, w)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)
    for key, value in _bn_state(ref).items():
        torch.testing.assert_close(_bn_state(enc)[key], value, atol=1e-6, rtol=1e-5, msg=key)


def test_train_mode_gradients_flow() -> None:
    torch.manual_seed(0)
    enc = AudioEncoder(AudioEncoderConfig(arch="conv", width=16)).train()
    enc(*_pad([_clip(0.4, 330, 0), _clip(0.9, 440, 1)])).square().sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in enc.parameters())


# --- frozen encoders ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ["conv", "wav2vec2"])
def test_frozen_encoder_has_no_gradients_and_stays_in_eval(arch: str) -> None:
    torch.manual_seed(0)
    enc = AudioEncoder(AudioEncoderConfig(arch=arch, width=32, layers=1, trainable=False))
    outer = nn.ModuleDict({"audio": enc}).train()  # a parent switching to training mode ...
    assert not enc.training and not any(m.training for m in enc.modules())  # ... leaves it in eval mode
    assert not any(p.requires_grad for p in enc.parameters())
    before = {k: v.clone() for k, v in enc.state_dict().items()}
    batch = _pad([_clip(0.3, 220, 0), _clip(0.8, 550, 1)])
    first, second = enc(*batch), enc(*batch)
    torch.testing.assert_close(first, second, atol=0, rtol=0)  # deterministic: no dropout, no stat updates
    for key, value in enc.state_dict().items():
        torch.testing.assert_close(value, before[key], atol=0, rtol=0, msg=key)
    outer.eval()
    assert AudioEncoder(AudioEncoderConfig(arch=arch, width=32, layers=1)).train().training  # trainable default


# --- pretrained torchaudio bundles ----------------------------------------------------------------------------------


def test_pretrained_bundle_offline_is_one_clear_error() -> None:
    with pytest.raises(ModelLoadError, match=r"cannot load the torchaudio bundle 'WAV2VEC2_BASE'.*network") as info:
        AudioEncoder(AudioEncoderConfig(arch="wav2vec2", pretrained="WAV2VEC2_BASE"))
    assert "network blocked in tests" in str(info.value)
    assert isinstance(info.value.__cause__, urllib.error.URLError)


def test_unknown_bundle_and_wrong_sample_rate_fail_before_any_download() -> None:
    with pytest.raises(ConfigError, match=r"unknown torchaudio bundle 'WAV2VEC3_HUGE'.*'WAV2VEC2_BASE'"):
        AudioEncoder(AudioEncoderConfig(arch="wav2vec2", pretrained="WAV2VEC3_HUGE"))
    with pytest.raises(ConfigError, match=r"sample_rate: 22050 Hz, but the WAV2VEC2_BASE bundle was trained at "
                                          r"16000 Hz; set item.audio.sample_rate=16000"):
        AudioEncoder(AudioEncoderConfig(arch="wav2vec2", pretrained="WAV2VEC2_BASE", sample_rate=22050))
    assert "WAV2VEC2_BASE" in wav2vec2_bundles() and "HUBERT_BASE" in wav2vec2_bundles()


def test_pretrained_needs_the_wav2vec2_arch() -> None:
    with pytest.raises(ConfigError, match=r"item\.audio\.pretrained: a torchaudio bundle needs arch 'wav2vec2'"):
        load_config("tiny", ["item.audio.pretrained=WAV2VEC2_BASE"])


@pytest.mark.parametrize("normalize_waveform", [False, True])
def test_pretrained_bundle_from_the_torch_hub_cache(normalize_waveform: bool, tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """A small stand-in bundle whose weights sit in the (temporary) torch hub cache: loaded through the real
    ``bundle.get_model()`` path with no network, its width becomes the feature dimension, and it can be frozen."""
    import torchaudio.pipelines as pipelines

    params = dict(pipelines.WAV2VEC2_BASE._params, extractor_conv_layer_config=[(16, 10, 5)] + [(16, 3, 2)] * 6,
                  encoder_embed_dim=48, encoder_pos_conv_kernel=16, encoder_pos_conv_groups=4,
                  encoder_num_layers=1, encoder_num_heads=2, encoder_ff_interm_features=64)
    filename = f"towerrec-test-bundle-{int(normalize_waveform)}.pth"
    bundle = dataclasses.replace(pipelines.WAV2VEC2_BASE, _path=filename, _params=params,
                                 _normalize_waveform=normalize_waveform)
    monkeypatch.setattr(pipelines, "TOWERREC_TEST_BUNDLE", bundle, raising=False)
    torch.manual_seed(123)
    source = torchaudio.models.wav2vec2_model(**params).eval()
    cache = Path(torch.hub.get_dir()) / "checkpoints"
    assert str(cache).startswith(str(tmp_path))  # the autouse fixture's empty cache, never the user's
    cache.mkdir(parents=True)
    torch.save(source.state_dict(), cache / filename)

    enc = AudioEncoder(AudioEncoderConfig(arch="wav2vec2", pretrained="TOWERREC_TEST_BUNDLE", trainable=False))
    assert enc.feature_dim == 48  # from the bundle, not from the config's width (64)
    assert not any(p.requires_grad for p in enc.parameters()) and not enc.train().training
    clips = [_clip(0.5, 300, 0), _clip(0.2, 600, 1)]
    with torch.no_grad():
        feats = enc(*_pad(clips))
        # The pretrained weights are really used: the same features as the source model, clip by clip.
        for row, c in enumerate(clips):
            wave = torch.nn.functional.layer_norm(c, c.shape) if normalize_waveform else c
            want = source.extract_features(wave[None])[0][-1].mean(1)[0]
            torch.testing.assert_close(feats[row], want, atol=1e-5, rtol=1e-4)
    assert feats.shape == (2, 48)
