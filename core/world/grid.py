"""Labelled image grids (PNG) for reports: rows = prompts, columns = models/methods."""

from __future__ import annotations

from pathlib import Path

import torch


def _font(size: int = 12):
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1
        return ImageFont.load_default()


def _wrap(text: str, width: int) -> list[str]:
    words, lines, cur = text.split(), [], ""
    for w in words:
        if len(cur) + len(w) + 1 > width and cur:
            lines.append(cur)
            cur = w
        else:
            cur = f"{cur} {w}".strip()
    if cur:
        lines.append(cur)
    return lines


def save_grid(
    columns: dict[str, torch.Tensor], row_labels: list[str], path, scale: int = 3, title: str | None = None
) -> Path:
    """``columns``: name -> images (N, 3, H, W) in [0, 1], N = len(row_labels)."""
    from PIL import Image, ImageDraw

    names = list(columns)
    n = len(row_labels)
    h, w = next(iter(columns.values())).shape[-2:]
    cw, ch = w * scale, h * scale
    label_w, head_h, pad = 220, 34 + (22 if title else 0), 4
    W = label_w + len(names) * (cw + pad) + pad
    H = head_h + n * (ch + pad) + pad
    img = Image.new("RGB", (W, H), (255, 255, 255))
    d = ImageDraw.Draw(img)
    f, fb = _font(12), _font(14)
    if title:
        d.text((pad, 4), title, fill=(0, 0, 0), font=fb)
    y0 = head_h - 28
    for j, name in enumerate(names):
        x = label_w + pad + j * (cw + pad)
        d.text((x + 2, y0), name, fill=(0, 0, 0), font=fb)
    for i, label in enumerate(row_labels):
        y = head_h + pad + i * (ch + pad)
        for k, line in enumerate(_wrap(label, 34)[:5]):
            d.text((pad, y + 2 + 14 * k), line, fill=(30, 30, 30), font=f)
        for j, name in enumerate(names):
            x = label_w + pad + j * (cw + pad)
            a = (columns[name][i].clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy()
            img.paste(Image.fromarray(a).resize((cw, ch), Image.NEAREST), (x, y))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)
    return path
