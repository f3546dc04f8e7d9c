"""Decoding and checking of audio clips and posters, and clean errors for broken files (data/media.py)."""

from __future__ import annotations

import math
import re
import warnings
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
import torchaudio
from PIL import Image

from data.media import MediaError, check_audio, check_image, load_audio, load_image, pad_waveforms

RATE = 16000
MAX_SECONDS = 3.0  # the short generated clips (1 s, 2.5 s) are kept whole, the others are cropped


@pytest.fixture(scope="module")
def clips(sample_clips: list[Path]) -> list[Path]:
    """Generated Ogg Vorbis clips: 1 s to 61 s, 16 to 44.1 kHz, mono and stereo (tests/synthetic.py)."""
    return sample_clips


@pytest.fixture(scope="module")
def poster(sample_poster: Path) -> Path:
    """A generated 92x138 JPEG poster."""
    return sample_poster


def test_clips_decode(clips: list[Path]) -> None:
    assert len(clips) >= 4
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


def test_poster_decodes(poster: Path) -> None:
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


# --- decompression bombs ----------------------------------------------------------------------------------


@pytest.mark.parametrize("limit", [1000, 10000])  # 92x138 = 12,696 pixels: over twice the limit, then over it
def test_image_over_pil_limit_is_media_error(poster: Path, monkeypatch: pytest.MonkeyPatch, limit: int) -> None:
    """Over twice the limit PIL raises DecompressionBombError (not an OSError); over it, only a warning."""
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", limit)
    expected = re.escape(f"{poster}: image too large: 12696 pixels, over PIL's limit of {limit} ")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no DecompressionBombWarning may leak out either
        with pytest.raises(MediaError, match=expected):
            load_image(poster, 32, (0.5,) * 3, (0.5,) * 3)
        with pytest.raises(MediaError, match=expected):
            check_image(poster)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 12696)
    assert check_image(poster) == (92, 138)


# --- full checks used by prepare --------------------------------------------------------------------------


def test_check_image_and_audio_accept_good_files(poster: Path, clips: list[Path]) -> None:
    assert check_image(poster) == (92, 138)
    for clip in clips:
        assert check_audio(clip) == sf.info(str(clip)).frames, clip.name


def test_check_image_refuses_truncated_and_missing(poster: Path, tmp_path: Path) -> None:
    half = tmp_path / "half.jpg"
    half.write_bytes(poster.read_bytes()[:1000])
    with pytest.raises(MediaError, match=r"half\.jpg: cannot decode image \(image file is truncated"):
        check_image(half)
    with pytest.raises(MediaError, match=r"absent\.png: cannot decode image"):
        check_image(tmp_path / "absent.png")


def test_check_audio_refuses_truncated_and_garbled_ogg(clips: list[Path], tmp_path: Path) -> None:
    data = clips[2].read_bytes()  # 5.5 s: a third of the way in is audio, past the headers
    cut = tmp_path / "cut.ogg"
    cut.write_bytes(data[: len(data) * 3 // 4])
    with pytest.raises(MediaError, match=rf"^{re.escape(str(cut))}: truncated Ogg file: the page at byte \d+ needs"):
        check_audio(cut)
    # Cut exactly after a complete page: only the missing end-of-stream flag gives it away.
    page_end = data.rindex(b"OggS")
    at_page = tmp_path / "at_page.ogg"
    at_page.write_bytes(data[:page_end])
    with pytest.raises(MediaError, match=r"at_page\.ogg: truncated Ogg file: the last page lacks the end-of-stream"):
        check_audio(at_page)
    garbled = bytearray(data)
    garbled[len(data) // 3:len(data) // 3 + 16] = b"\x00" * 16
    (tmp_path / "garbled.ogg").write_bytes(bytes(garbled))
    with pytest.raises(MediaError, match=r"garbled\.ogg: corrupt Ogg file: bad checksum in the page at byte \d+"):
        check_audio(tmp_path / "garbled.ogg")
    with sf.SoundFile(str(tmp_path / "garbled.ogg")) as f:  # what prepare used to miss: it decodes fine
        assert sum(len(b) for b in f.blocks(65536)) == f.frames


def test_check_audio_refuses_truncated_wav_flac_and_nan(tmp_path: Path) -> None:
    tone = (0.5 * np.sin(np.arange(2 * RATE, dtype=np.float32) / 5)).astype(np.float32)
    for name, subtype in [("tone.wav", "PCM_16"), ("tone.flac", "PCM_16")]:
        sf.write(str(tmp_path / name), tone, RATE, subtype=subtype)
        assert check_audio(tmp_path / name) == 2 * RATE
        data = (tmp_path / name).read_bytes()
        (tmp_path / f"cut-{name}").write_bytes(data[: len(data) // 2])
    with pytest.raises(MediaError, match=r"cut-tone\.wav: truncated WAV file: its data chunk declares 64000 bytes"):
        check_audio(tmp_path / "cut-tone.wav")
    with pytest.raises(MediaError, match=r"cut-tone\.flac: cannot decode audio"):
        check_audio(tmp_path / "cut-tone.flac")
    bad = tone.copy()
    bad[RATE + 5] = np.nan
    sf.write(str(tmp_path / "nan.wav"), bad, RATE, subtype="FLOAT")
    with pytest.raises(MediaError, match=r"nan\.wav: audio holds non-finite samples"):
        check_audio(tmp_path / "nan.wav")
    sf.write(str(tmp_path / "empty.wav"), np.zeros((0, 1), dtype=np.float32), RATE)
    with pytest.raises(MediaError, match=r"empty\.wav: audio has no samples"):
        check_audio(tmp_path / "empty.wav")
    (tmp_path / "noise.ogg").write_bytes(np.random.default_rng(0).bytes(4096))
    with pytest.raises(MediaError, match=r"noise\.ogg: cannot decode audio"):
        check_audio(tmp_path / "noise.ogg")


# --- load_audio reads only the centre crop ----------------------------------------------------------------


def _full_decode_then_crop(path: Path, sample_rate: int, max_seconds: float) -> torch.Tensor:
    """The previous load_audio, kept as the reference: decode everything, mix to mono, centre-crop, resample."""
    data, sr = sf.read(str(path), dtype="float32", always_2d=True)
    wave = torch.from_numpy(data.mean(axis=1))
    max_in = int(max_seconds * sr)
    if wave.numel() > max_in:
        start = (wave.numel() - max_in) // 2
        wave = wave[start:start + max_in]
    if sr != sample_rate:
        wave = torchaudio.functional.resample(wave, sr, sample_rate)
    return wave


def test_load_audio_matches_full_decode(clips: list[Path], tmp_path: Path) -> None:
    picked = clips[:3]  # 1 s at 16 kHz, 2.5 s stereo at 22.05 kHz, 5.5 s at 44.1 kHz
    stereo = tmp_path / "stereo.flac"
    rng = np.random.default_rng(0)
    sf.write(str(stereo), (0.3 * rng.standard_normal((5 * 22050, 2))).astype(np.float32), 22050)
    for path in [*picked, stereo]:
        for rate, seconds in [(16000, 1.0), (16000, 3.0), (22050, 2.5), (16000, 600.0)]:
            new = load_audio(path, rate, seconds)
            assert torch.equal(new, _full_decode_then_crop(path, rate, seconds)), (path.name, rate, seconds)


def test_load_audio_reads_only_the_crop(clips: list[Path], monkeypatch: pytest.MonkeyPatch) -> None:
    clip = max(clips, key=lambda c: sf.info(str(c)).frames)  # 61 s at 22,050 Hz
    info = sf.info(str(clip))
    requested, returned = [], []
    real_read = sf.SoundFile.read

    def spy(self, frames=-1, *args, **kwargs):
        out = real_read(self, frames, *args, **kwargs)
        requested.append(frames)
        returned.append(len(out))
        return out

    monkeypatch.setattr(sf.SoundFile, "read", spy)
    monkeypatch.setattr(sf, "read", lambda *a, **k: pytest.fail("load_audio must not decode the whole file"))
    wave = load_audio(clip, info.samplerate, 2.0)
    assert requested == [2 * info.samplerate] and returned == [2 * info.samplerate]
    assert sum(returned) * 30 < info.frames
    assert wave.shape == (2 * info.samplerate,)


def test_load_audio_refuses_short_read(clips: list[Path], monkeypatch: pytest.MonkeyPatch) -> None:
    """A file whose header promises more frames than decoding yields is reported, not silently padded."""
    real_read = sf.SoundFile.read
    monkeypatch.setattr(sf.SoundFile, "read", lambda self, frames=-1, *a, **k: real_read(self, frames, *a, **k)[:10])
    with pytest.raises(MediaError, match=rf"^{re.escape(str(clips[0]))}: truncated audio: decoded 10 of the \d+ "):
        load_audio(clips[0], RATE, MAX_SECONDS)


def test_load_audio_refuses_garbage_wav(tmp_path: Path) -> None:
    noise = tmp_path / "noise.wav"
    noise.write_bytes(b"RIFF\x10\x00\x00\x00WAVEjunk" + np.random.default_rng(1).bytes(512))
    with pytest.raises(MediaError, match=rf"^{re.escape(str(noise))}: cannot decode audio"):
        load_audio(noise, RATE, MAX_SECONDS)
