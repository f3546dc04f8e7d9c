"""Decoding of item media (runs in dataset / DataLoader code, never inside a tower's forward).

Each loader raises :class:`MediaError` naming the file for anything it cannot decode.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from errors import MediaError


def load_image(path: str | Path, size: int, mean: tuple[float, ...], std: tuple[float, ...]) -> torch.Tensor:
    """Decode an image to a normalised ``(3, size, size)`` float tensor (RGB, bicubic resize, centre crop)."""
    from PIL import Image, UnidentifiedImageError

    path = Path(path)
    try:
        with Image.open(path) as img:
            img.load()
            img = img.convert("RGB")
    except (FileNotFoundError, UnidentifiedImageError, OSError, SyntaxError) as err:
        raise MediaError(f"{path}: cannot decode image ({err})") from None
    w, h = img.size
    scale = size / min(w, h)
    img = img.resize((max(size, round(w * scale)), max(size, round(h * scale))), Image.BICUBIC)
    left, top = (img.width - size) // 2, (img.height - size) // 2
    img = img.crop((left, top, left + size, top + size))
    x = torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0).permute(2, 0, 1)  # (3, S, S)
    return (x - torch.tensor(mean)[:, None, None]) / torch.tensor(std)[:, None, None]


def load_audio(path: str | Path, sample_rate: int, max_seconds: float) -> torch.Tensor:
    """Decode audio with soundfile to a mono float waveform at ``sample_rate``, centre-cropped to ``max_seconds``."""
    import soundfile as sf
    import torchaudio

    path = Path(path)
    try:
        data, sr = sf.read(str(path), dtype="float32", always_2d=True)  # (N, C)
    except (RuntimeError, OSError, sf.LibsndfileError) as err:
        raise MediaError(f"{path}: cannot decode audio ({err})") from None
    if data.shape[0] == 0:
        raise MediaError(f"{path}: audio has no samples")
    wave = torch.from_numpy(data.mean(axis=1))  # (N,)
    max_in = int(max_seconds * sr)
    if wave.numel() > max_in:  # crop before resampling: cheaper
        start = (wave.numel() - max_in) // 2
        wave = wave[start:start + max_in]
    if sr != sample_rate:
        wave = torchaudio.functional.resample(wave, sr, sample_rate)
    return wave


def pad_waveforms(waves: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad waveforms to ``(B, N)`` and return their lengths ``(B,)``."""
    lengths = torch.tensor([w.numel() for w in waves], dtype=torch.long)
    out = torch.zeros(len(waves), int(lengths.max()) if len(waves) else 0)
    for i, w in enumerate(waves):
        out[i, : w.numel()] = w
    return out, lengths
