"""Decoding and checking of item media.

Two kinds of functions live here:

- ``load_image`` / ``load_audio`` decode one file into a tensor. They run in dataset / DataLoader code, never
  inside a tower's forward. ``load_audio`` reads only the frames it keeps (the centre crop), not the whole
  file.
- ``check_image`` / ``check_audio`` decode a file completely once, when a catalog is written, so that a
  corrupt or truncated file is refused by ``prepare`` (naming the item) instead of failing mid-training.

Every function raises :class:`MediaError` naming the file for anything it cannot decode. Images larger than
PIL's ``Image.MAX_IMAGE_PIXELS`` are refused too (PIL would only warn below twice that limit, and raise an
error that is not an ``OSError`` above it).

What the checks can and cannot see: a truncated JPEG/PNG fails PIL's full decode. A truncated WAV still
decodes (libsndfile quietly shortens it), so the RIFF ``data`` chunk's declared size is compared with the
file. Ogg files are walked page by page: every page's CRC must match and the last page must carry the
end-of-stream flag, which catches both truncation and garbled bytes (libvorbis skips a bad page silently).
Bytes garbled inside a JPEG's compressed data often still decode (JPEG has no checksum) and then pass.
"""

from __future__ import annotations

import mmap
import re
import warnings
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from errors import MediaError

if TYPE_CHECKING:  # torch is imported lazily: `prepare` checks media without paying for a torch import
    import torch

AUDIO_BLOCK_FRAMES = 1 << 16  # frames per block when checking audio: bounded memory on long files


# --- images --------------------------------------------------------------------------------------------


def _decode_image(path: Path, finish: Callable):
    """Open ``path``, decode all of it, and return ``finish(image)``; every failure is a :class:`MediaError`.

    ``finish`` runs while the file is open (an opened PIL image is unusable once closed), e.g. ``convert``.
    """
    from PIL import Image, UnidentifiedImageError

    try:
        # Over MAX_IMAGE_PIXELS PIL only warns (and raises DecompressionBombError, not an OSError, over twice
        # that). Either way the file would cost gigabytes to decode: make the warning an error and refuse both.
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as img:
                img.load()  # the whole file: a truncated one fails here, not half-way through training
                return finish(img)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        raise MediaError(f"{path}: image too large: {_pixels(err)} pixels, over PIL's limit of "
                         f"{Image.MAX_IMAGE_PIXELS} (Image.MAX_IMAGE_PIXELS; a decompression bomb?)") from None
    except (FileNotFoundError, UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
        raise MediaError(f"{path}: cannot decode image ({err})") from None


def _pixels(err: Exception) -> str:
    """The pixel count PIL puts in its decompression-bomb message ("Image size (N pixels) exceeds ...")."""
    found = re.search(r"\((\d+) pixels\)", str(err))
    return found.group(1) if found else f"? ({err})"


def check_image(path: str | Path) -> tuple[int, int]:
    """Decode an image completely (catches truncation and bad data); returns its ``(width, height)``."""
    return _decode_image(Path(path), lambda img: img.size)


def load_image(path: str | Path, size: int, mean: tuple[float, ...], std: tuple[float, ...]) -> torch.Tensor:
    """Decode an image to a normalised ``(3, size, size)`` float tensor (RGB, bicubic resize, centre crop)."""
    import torch
    from PIL import Image

    path = Path(path)
    img = _decode_image(path, lambda opened: opened.convert("RGB"))
    w, h = img.size
    scale = size / min(w, h)
    img = img.resize((max(size, round(w * scale)), max(size, round(h * scale))), Image.BICUBIC)
    left, top = (img.width - size) // 2, (img.height - size) // 2
    img = img.crop((left, top, left + size, top + size))
    x = torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0).permute(2, 0, 1)  # (3, S, S)
    return (x - torch.tensor(mean)[:, None, None]) / torch.tensor(std)[:, None, None]


# --- audio ---------------------------------------------------------------------------------------------


def load_audio(path: str | Path, sample_rate: int, max_seconds: float) -> torch.Tensor:
    """Decode audio with soundfile to a mono float waveform at ``sample_rate``, centre-cropped to ``max_seconds``.

    Only the kept frames are read: the frame count and rate come from the header, the file is seeked to the
    crop's start and ``max_seconds`` worth of frames are decoded (the same samples a full decode would give).
    """
    import soundfile as sf
    import torch
    import torchaudio

    path = Path(path)
    try:
        with sf.SoundFile(str(path)) as f:
            frames, sr = f.frames, f.samplerate
            if frames <= 0:
                raise MediaError(f"{path}: audio has no samples")
            max_in = int(max_seconds * sr)
            want = frames
            if frames > max_in:  # centre crop before decoding and resampling: cheaper on both counts
                f.seek((frames - max_in) // 2)
                want = max_in
            data = f.read(want, dtype="float32", always_2d=True)  # (want, C)
    except (RuntimeError, OSError, sf.LibsndfileError) as err:
        raise MediaError(f"{path}: cannot decode audio ({err})") from None
    if data.shape[0] < want:
        raise MediaError(f"{path}: truncated audio: decoded {data.shape[0]} of the {want} frames expected")
    wave = torch.from_numpy(np.ascontiguousarray(data.mean(axis=1)))  # (N,)
    if sr != sample_rate:
        wave = torchaudio.functional.resample(wave, sr, sample_rate)
    return wave


_BIT_REVERSED = bytes(int(f"{b:08b}"[::-1], 2) for b in range(256))


def _ogg_crc(page: bytes) -> int:
    """Ogg's page CRC (poly 0x04C11DB7, MSB first, init 0, no final xor), computed with zlib's C CRC-32.

    zlib's CRC is the bit-reflected form of the same polynomial, so feeding it bit-reversed bytes with a zero
    register and bit-reversing the result gives Ogg's value at C speed (a Python loop would be ~100x slower).
    """
    reflected = zlib.crc32(page.translate(_BIT_REVERSED), 0xFFFFFFFF) ^ 0xFFFFFFFF
    return int(f"{reflected:032b}"[::-1], 2)


def _check_ogg(path: Path, data: bytes | mmap.mmap) -> None:
    """Walk every Ogg page: capture pattern, complete page, CRC, and end-of-stream on the last page."""
    pos, flags = 0, 0
    while pos < len(data):
        if data[pos:pos + 4] != b"OggS":
            raise MediaError(f"{path}: corrupt Ogg file: no page starts at byte {pos} (garbled data?)")
        if pos + 27 > len(data) or pos + 27 + data[pos + 26] > len(data):
            raise MediaError(f"{path}: truncated Ogg file: the page at byte {pos} is cut short")
        n_segments = data[pos + 26]
        end = pos + 27 + n_segments + sum(data[pos + 27:pos + 27 + n_segments])
        if end > len(data):
            raise MediaError(f"{path}: truncated Ogg file: the page at byte {pos} needs {end} bytes, "
                             f"the file has {len(data)}")
        page = data[pos:end]
        stored = int.from_bytes(page[22:26], "little")
        if _ogg_crc(page[:22] + b"\0\0\0\0" + page[26:]) != stored:
            raise MediaError(f"{path}: corrupt Ogg file: bad checksum in the page at byte {pos} (garbled data)")
        flags, pos = page[5], end
    if not flags & 0x04:
        raise MediaError(f"{path}: truncated Ogg file: the last page lacks the end-of-stream flag")


def _check_riff(path: Path, head: bytes, file_size: int) -> None:
    """A WAV's ``data`` chunk must fit in the file (libsndfile silently decodes a truncated one).

    ``head`` is the start of the file; the chunks before ``data`` (``fmt``, ``LIST``, ...) are small.
    """
    order = "little" if head[:4] == b"RIFF" else "big"  # RIFX is the big-endian variant
    pos = 12
    while pos + 8 <= len(head):
        chunk, size = head[pos:pos + 4], int.from_bytes(head[pos + 4:pos + 8], order)
        if chunk == b"data":
            # 0 and 0xFFFFFFFF mean "unknown" (streamed writers, RF64): nothing to compare against.
            if size not in (0, 0xFFFFFFFF) and pos + 8 + size > file_size:
                raise MediaError(f"{path}: truncated WAV file: its data chunk declares {size} bytes, "
                                 f"{file_size - pos - 8} are present")
            return
        pos += 8 + size + (size & 1)  # chunks are padded to an even length


def check_audio(path: str | Path) -> int:
    """Decode an audio file completely, in blocks, and check its container; returns its frame count.

    Refuses files soundfile cannot open or decode, truncated or garbled Ogg and WAV files (see the module
    docstring), files that decode to fewer frames than their header declares, files with no samples, and
    non-finite samples (NaN or infinity in a float WAV).
    """
    import soundfile as sf

    path = Path(path)
    try:
        with path.open("rb") as f:
            head = f.read(12)
            # Containers whose damage libsndfile decodes through quietly get a structural check first
            # (memory-mapped: a long recording is not read into memory at once).
            if head[:4] == b"OggS":
                with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
                    _check_ogg(path, data)
            elif head[:4] in (b"RIFF", b"RIFX") and head[8:12] == b"WAVE":
                _check_riff(path, head + f.read(1 << 16), path.stat().st_size)
    except OSError as err:
        raise MediaError(f"{path}: cannot decode audio ({err})") from None
    decoded = 0
    try:
        with sf.SoundFile(str(path)) as f:
            declared = f.frames
            for block in f.blocks(AUDIO_BLOCK_FRAMES, dtype="float32", always_2d=True):
                if not np.isfinite(block).all():
                    raise MediaError(f"{path}: audio holds non-finite samples (NaN or infinity) near frame "
                                     f"{decoded}")
                decoded += block.shape[0]
    except (RuntimeError, OSError, sf.LibsndfileError) as err:
        raise MediaError(f"{path}: cannot decode audio ({err})") from None
    if decoded == 0:
        raise MediaError(f"{path}: audio has no samples")
    if decoded < declared:
        raise MediaError(f"{path}: truncated audio: decoded {decoded} of the {declared} frames its header declares")
    return decoded


def pad_waveforms(waves: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad waveforms to ``(B, N)`` and return their lengths ``(B,)``."""
    import torch

    lengths = torch.tensor([w.numel() for w in waves], dtype=torch.long)
    out = torch.zeros(len(waves), int(lengths.max()) if len(waves) else 0)
    for i, w in enumerate(waves):
        out[i, : w.numel()] = w
    return out, lengths
