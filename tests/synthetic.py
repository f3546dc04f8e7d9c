"""Small synthetic catalogs for the suite: generated titles and text, PIL posters, numpy audio, planted tastes.

Nothing here reads ``../shared``: the suite builds these on any clone. The interactions carry a structure a
model can learn: each item belongs to one of a few genres (named in its title's first word and its text,
drawn in its poster's colour), each user mostly watches one genre, and within a genre some items are far
more popular than others. Timestamps increase along each user's history, so leave-one-out splits are
well defined.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl

GENRES = {
    "space": ("Starship", "Nebula", "Orbit", "Comet", "Galaxy", "Rocket"),
    "crime": ("Heist", "Alibi", "Detective", "Verdict", "Witness", "Ransom"),
    "cartoon": ("Toybox", "Puppy", "Balloon", "Cookie", "Rainbow", "Teddy"),
    "western": ("Saloon", "Outlaw", "Canyon", "Sheriff", "Stagecoach", "Prairie"),
    "romance": ("Sonnet", "Valentine", "Rose", "Promise", "Waltz", "Honeymoon"),
    "horror": ("Crypt", "Phantom", "Shadow", "Raven", "Gravestone", "Haunting"),
}
NOUNS = ("Story", "Night", "Road", "Return", "Affair", "Legacy", "Secret", "Summer", "Code", "Island",
         "Kingdom", "Promise", "Journey", "Letter", "Edge")
# Poster colours, one per genre (RGB).
COLOURS = ((30, 40, 160), (90, 90, 90), (240, 200, 40), (170, 100, 40), (220, 60, 120), (20, 120, 40))
# Item ids the tests name explicitly; the rest are drawn from 1..300.
ANCHOR_IDS = (1, 50, 100, 181, 258)


@dataclass(frozen=True)
class SyntheticCatalog:
    items: pl.DataFrame
    interactions: pl.DataFrame
    media: dict[str, Path]
    genre_of: dict[int, str]


# The clips of the most popular items: (seconds, sample rate, channels). Short and long, mono and stereo,
# so both branches of the decoder's crop and its resampling run.
CLIP_SPECS = ((1.0, 16_000, 1), (2.5, 22_050, 2), (5.5, 44_100, 1), (61.0, 22_050, 1))
POSTER_SIZE = (92, 138)  # width, height: portrait, like a film poster


def _poster(path: Path, colour: tuple[int, int, int], seed: int) -> None:
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(seed)
    w, h = POSTER_SIZE
    noise = rng.integers(-40, 41, (h, w, 3))
    img = Image.fromarray(np.clip(np.array(colour) + noise, 0, 255).astype(np.uint8), mode="RGB")
    draw = ImageDraw.Draw(img)
    for _ in range(3):
        x, y = int(rng.integers(0, w - 24)), int(rng.integers(0, h - 24))
        draw.ellipse([x, y, x + 24, y + 24], fill=tuple(int(v) for v in rng.integers(0, 256, 3)))
    img.save(path, format="JPEG", quality=85)


def _clip(path: Path, freq: float, seconds: float, sample_rate: int, channels: int) -> None:
    import soundfile as sf

    t = np.arange(int(seconds * sample_rate)) / sample_rate
    wave = 0.3 * np.sin(2 * np.pi * freq * t) * (0.6 + 0.4 * np.cos(2 * np.pi * 0.5 * t))  # a pulsing tone
    if channels > 1:
        wave = np.stack([wave] + [0.5 * wave] * (channels - 1), axis=1)
    sf.write(path, wave.astype(np.float32), sample_rate, format="OGG", subtype="VORBIS")


def synthetic_catalog(media_dir: Path, *, n_items: int = 150, n_users: int = 60, seed: int = 0) -> SyntheticCatalog:
    """Items, interactions and media (written under ``media_dir``) ready for ``write_catalog``.

    ``n_items`` items with int ids drawn from 1..2*n_items (``ANCHOR_IDS`` always among them), titles like
    ``"Nebula Story (1996)"`` (unique; one in six each from 1994, 1995 and 1996), a sentence of text naming the genre, a
    92x138 JPEG poster for five items in six and an OGG clip (``CLIP_SPECS``) for each of the most popular
    items. ``n_users`` users
    with 10 to 40 interactions each: 80% from their genre, popularity-skewed.
    """
    rng = np.random.default_rng(seed)
    media_dir = Path(media_dir)
    (media_dir / "posters").mkdir(parents=True, exist_ok=True)
    (media_dir / "audio").mkdir(parents=True, exist_ok=True)

    pool = np.setdiff1d(np.arange(1, 2 * n_items + 1), ANCHOR_IDS)
    ids = np.sort(np.concatenate([ANCHOR_IDS, rng.choice(pool, n_items - len(ANCHOR_IDS), replace=False)]))
    genres = list(GENRES)
    genre_idx = rng.integers(0, len(genres), n_items)
    popularity = 1.0 / (1 + rng.permutation(n_items)) ** 0.8  # Zipf-like, in a random order over items
    titles, texts, years = [], [], []
    seen: set[str] = set()
    for pos, g in enumerate(genre_idx):
        words = GENRES[genres[g]]
        year = (1994, 1995, 1996)[pos % 3] if pos % 2 == 0 else int(rng.integers(1940, 2000))
        while True:
            name = f"{words[int(rng.integers(len(words)))]} {NOUNS[int(rng.integers(len(NOUNS)))]}"
            if name not in seen:
                break
            name = f"{name} {int(rng.integers(2, 9))}"
            if name not in seen:
                break
        seen.add(name)
        titles.append(f"{name} ({year})")
        years.append(year)
        texts.append(f"A {genres[g]} film: {words[0].lower()}s, {words[1].lower()}s and a {words[2].lower()} "
                     f"in a tale of {NOUNS[pos % len(NOUNS)].lower()}.")

    media: dict[str, Path] = {}
    image_paths: list[str | None] = []
    for pos, item_id in enumerate(ids):
        if pos % 6 == 5:
            image_paths.append(None)
            continue
        src = media_dir / "posters" / f"{item_id}.jpg"
        _poster(src, COLOURS[genre_idx[pos]], seed * 100_003 + int(item_id))
        rel = f"media/posters/{item_id}.jpg"
        media[rel] = src
        image_paths.append(rel)
    audio_paths: list[str | None] = [None] * n_items
    for rank, pos in enumerate(np.argsort(-popularity, kind="stable")[:len(CLIP_SPECS)]):
        src = media_dir / "audio" / f"clip-{ids[pos]}.ogg"
        seconds, rate, channels = CLIP_SPECS[rank]
        _clip(src, 220.0 * (rank + 1), seconds, rate, channels)
        rel = f"media/audio/{src.name}"
        media[rel] = src
        audio_paths[pos] = rel

    rows = []
    t0 = 880_000_000
    for user in range(1, n_users + 1):
        favourite = int(rng.integers(len(genres)))
        n = int(rng.integers(10, 41))
        weight = popularity * np.where(genre_idx == favourite, 4.0 * (len(genres) - 1), 1.0)
        chosen = rng.choice(n_items, size=min(n, n_items), replace=False, p=weight / weight.sum())
        start = t0 + user * 1_000
        stars = rng.integers(1, 6, len(chosen)).astype(float)
        rows += [(user, int(ids[pos]), start + 60 * t, stars[t]) for t, pos in enumerate(chosen)]
    items = pl.DataFrame({
        "item_id": ids.astype(np.int64), "title": titles, "text": texts,
        "year": pl.Series(years, dtype=pl.Int64),
        "image_path": pl.Series(image_paths, dtype=pl.Utf8), "audio_path": pl.Series(audio_paths, dtype=pl.Utf8),
    })
    interactions = pl.DataFrame(rows, schema={"user_id": pl.Int64, "item_id": pl.Int64, "timestamp": pl.Int64,
                                                  "rating": pl.Float64},
                                orient="row")
    return SyntheticCatalog(items, interactions, media, {int(i): genres[g] for i, g in zip(ids, genre_idx)})
