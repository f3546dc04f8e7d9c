"""Training curves as a PNG beside the run: loss and validation NDCG@10 per epoch, best epoch marked.

Drawn with Pillow (already a dependency) rather than adding a plotting library to the install.
"""

from __future__ import annotations

from pathlib import Path

from PIL import Image, ImageDraw

W, H, PAD = 360, 240, 36  # one panel


def _panel(draw: ImageDraw.ImageDraw, left: int, values: list[float], title: str, best: int | None,
           colour: tuple[int, int, int]) -> None:
    x0, y0, x1, y1 = left + PAD, PAD, left + W - 12, H - PAD  # plot area
    draw.rectangle((x0, y0, x1, y1), outline=(160, 160, 160))
    draw.text((left + PAD, 10), title, fill=(0, 0, 0))
    finite = [v for v in values if v == v]
    if not finite:
        return
    lo, hi = min(finite), max(finite)
    span = (hi - lo) or 1.0
    n = max(1, len(values) - 1)

    def xy(i: int, v: float) -> tuple[float, float]:
        return x0 + (x1 - x0) * i / n, y1 - (y1 - y0) * (v - lo) / span

    points = [xy(i, v) for i, v in enumerate(values) if v == v]
    if len(points) > 1:
        draw.line(points, fill=colour, width=2)
    for p in points:
        draw.ellipse((p[0] - 2, p[1] - 2, p[0] + 2, p[1] + 2), fill=colour)
    if best is not None and 0 <= best < len(values):
        bx = xy(best, values[best])[0]
        draw.line((bx, y0, bx, y1), fill=(200, 60, 60), width=1)
        draw.text((bx + 3, y0 + 3), f"best {best}", fill=(200, 60, 60))
    draw.text((left + 2, y0 - 4), f"{hi:.4g}", fill=(80, 80, 80))
    draw.text((left + 2, y1 - 8), f"{lo:.4g}", fill=(80, 80, 80))
    draw.text((x0, y1 + 6), "epoch 0", fill=(80, 80, 80))
    draw.text((x1 - 40, y1 + 6), f"epoch {len(values) - 1}", fill=(80, 80, 80))


def plot_curves(history: list[dict], best_epoch: int | None, path: str | Path, title: str = "") -> None:
    """Write ``path`` (PNG): training loss and validation NDCG@10 per epoch."""
    img = Image.new("RGB", (2 * W, H + 18), "white")
    draw = ImageDraw.Draw(img)
    _panel(draw, 0, [float(h.get("loss", float("nan"))) for h in history], "training loss", best_epoch,
           (40, 90, 200))
    _panel(draw, W, [float(h.get("ndcg@10", float("nan"))) for h in history], "validation NDCG@10", best_epoch,
           (30, 150, 60))
    if title:
        draw.text((PAD, H), title, fill=(0, 0, 0))
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    img.save(tmp, format="PNG")
    tmp.replace(path)
