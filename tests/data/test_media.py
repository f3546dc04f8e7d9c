"""Decoding of real audio clips and posters, and clean errors for broken files (train/media.py)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from PIL import Image

from data.media import MediaError, load_audio, load_image, pad_waveforms

RATE = 16000
MAX_SECONDS = 3.0  # the shortest real clip (2.7 s) is kept whole, the others are cropped


@pytest.fixture(scope="module")
def clips(shared_datasets: Path) -> list[Path]:
    found = sorted((shared_datasets / "audio-clips").glob("*.ogg"))
    if not found:
        pytest.skip("no audio clips in shared/datasets/audio-clips")
    return found


@pytest.fixture(scope="module")
def poster(ml100k_dir: Path) -> Path:
    return ml100k_dir / "posters" / "1.jpg"


def test_real_clips_decode(clips: list[Path]) -> None:
    assert len(clips) >= 14
    for clip in clips:
        info = sf.info(str(clip))
        wave = load_audio(clip, RATE, MAX_SECONDS)
        assert wave.dim() == 1 and wave.dtype == torch.float32, clip.name
        kept = min(info.frames, int(MAX_SECONDS * info.samplerate))  # input samples after the crop
        assert abs(wave.numel() - kept * RATE / info.samplerate) <= 1, clip.name
        assert wave.numel() <= MAX_SECONDS * RATE + 1, clip.name
        assert torch.isfinite(wave).all(), clip.name
        assert 1e-4 < wave.std().item() and wave.abs().max().item() <= 1.5, clip.name
    durations = [sf.info(str(c)).duration for c in clips]
    assert min(durations) < MAX_SECONDS < max(durations)  # both branches of the crop ran


def test_centre_crop_and_mono_mix(tmp_path: Path) -> None:
    ramp = np.arange(3 * RATE, dtype=np.float32) / (3 * RATE)  # 3 s, values in [0, 1)
    stereo = np.stack([ramp, np.zeros_like(ramp)], axis=1)  # (N, 2): left ramp, right silence
    path = tmp_path / "stereo.wav"
    sf.write(str(path), stereo, RATE, subtype="FLOAT")
    wave = load_audio(path, RATE, 1.0)
    assert wave.shape == (RATE,)
    # the middle second, averaged over the two channels
    torch.testing.assert_close(wave, torch.from_numpy(ramp[RATE:2 * RATE] / 2))


def test_resample_to_target_rate(tmp_path: Path) -> None:
    t = np.arange(8000, dtype=np.float32) / 8000  # 1 s at 8 kHz
    path = tmp_path / "tone.wav"
    sf.write(str(path), 0.5 * np.sin(2 * math.pi * 440 * t), 8000, subtype="FLOAT")
    wave = load_audio(path, RATE, 10.0)
    assert wave.shape == (RATE,)
    # still a 440 Hz tone: the spectrum peaks at bin 440 (1 Hz bins over 1 s)
    assert int(torch.fft.rfft(wave).abs().argmax()) == 440


def test_truncated_ogg_raises(clips: list[Path], tmp_path: Path) -> None:
    broken = tmp_path / "truncated.ogg"
    broken.write_bytes(clips[0].read_bytes()[:200])
    with pytest.raises(MediaError, match="truncated.ogg") as err:
        load_audio(broken, RATE, MAX_SECONDS)
    assert str(err.value).startswith(str(broken))


def test_missing_and_empty_audio_raise(tmp_path: Path) -> None:
    with pytest.raises(MediaError, match=r"absent\.ogg: cannot decode audio"):
        load_audio(tmp_path / "absent.ogg", RATE, MAX_SECONDS)
    empty = tmp_path / "empty.wav"
    sf.write(str(empty), np.zeros((0, 1), dtype=np.float32), RATE)
    with pytest.raises(MediaError, match=r"empty\.wav: audio has no samples"):
        load_audio(empty, RATE, MAX_SECONDS)


def test_real_poster_decodes(poster: Path) -> None:
    x = load_image(poster, 32, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
    assert x.shape == (3, 32, 32) and x.dtype == torch.float32
    assert x.min() >= -2.0 - 1e-6 and x.max() <= 2.0 + 1e-6  # (v - 0.5) / 0.25 for v in [0, 1]
    assert x.std() > 0.1


def test_poster_centre_crop_matches_pil(poster: Path) -> None:
    with Image.open(poster) as img:
        rgb = np.asarray(img.convert("RGB"), dtype=np.float32) / 255.0  # (H, W, 3)
    h, w, _ = rgb.shape
    assert (w, h) == (92, 138)
    # size = width: no resize, only a vertical centre crop
    x = load_image(poster, w, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0))
    top = (h - w) // 2
    torch.testing.assert_close(x, torch.from_numpy(rgb[top:top + w]).permute(2, 0, 1))
    mean, std = (0.48, 0.45, 0.40), (0.27, 0.26, 0.28)
    y = load_image(poster, w, mean, std)
    torch.testing.assert_close(y * torch.tensor(std)[:, None, None] + torch.tensor(mean)[:, None, None], x)


def test_grayscale_image_becomes_rgb(tmp_path: Path) -> None:
    path = tmp_path / "gray.png"
    Image.fromarray(np.full((10, 20), 51, dtype=np.uint8), mode="L").save(path)
    x = load_image(path, 8, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0))
    assert x.shape == (3, 8, 8)
    torch.testing.assert_close(x, torch.full((3, 8, 8), 0.2), atol=1e-3, rtol=0)


def test_corrupt_jpg_raises(tmp_path: Path) -> None:
    corrupt = tmp_path / "corrupt.jpg"
    corrupt.write_bytes(np.random.default_rng(0).bytes(2048))
    with pytest.raises(MediaError, match="corrupt.jpg") as err:
        load_image(corrupt, 32, (0.5,) * 3, (0.5,) * 3)
    assert str(err.value).startswith(str(corrupt))


def test_truncated_and_missing_jpg_raise(poster: Path, tmp_path: Path) -> None:
    half = tmp_path / "half.jpg"
    data = poster.read_bytes()
    half.write_bytes(data[: len(data) // 2])
    with pytest.raises(MediaError, match=r"half\.jpg: cannot decode image"):
        load_image(half, 32, (0.5,) * 3, (0.5,) * 3)
    with pytest.raises(MediaError, match=r"absent\.jpg: cannot decode image"):
        load_image(tmp_path / "absent.jpg", 32, (0.5,) * 3, (0.5,) * 3)


def test_pad_waveforms() -> None:
    waves = [torch.tensor([1.0, 2.0, 3.0]), torch.tensor([4.0]), torch.arange(5, dtype=torch.float32)]
    batch, lengths = pad_waveforms(waves)
    assert lengths.dtype == torch.long and lengths.tolist() == [3, 1, 5]
    assert batch.shape == (3, 5)
    assert batch.tolist() == [[1, 2, 3, 0, 0], [4, 0, 0, 0, 0], [0, 1, 2, 3, 4]]


def test_pad_waveforms_empty() -> None:
    batch, lengths = pad_waveforms([])
    assert batch.shape == (0, 0)
    assert lengths.tolist() == []
