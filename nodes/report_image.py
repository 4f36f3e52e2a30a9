"""A picture of an edit's report, drawn with PIL only (no matplotlib).

One row per edited module: a bar for ‖ΔW‖/‖W‖ (log scale, so 1e-4 and 0.5 are both visible) and,
where the solver reported them, the residual before → after (docs/method.md, "Erase report").
Returned as ComfyUI's IMAGE layout: float tensor [1, H, W, 3] in 0..1.
"""
from __future__ import annotations

import math

ROW = 16
LEFT = 250
BAR_W = 260
NUM_W = 70
RES_W = 240
PAD = 10
BG = (24, 26, 30)
FG = (225, 228, 232)
DIM = (140, 146, 155)
BAR = (92, 160, 255)
BEFORE = (235, 120, 90)
AFTER = (110, 210, 130)


def short_name(name: str) -> str:
    s = name
    for a, b in (("unet.", "U "), ("text_encoder_2.text_model.encoder.layers.", "TE2 L"),
                 ("text_encoder.text_model.encoder.layers.", "TE L"), ("down_blocks.", "down"),
                 ("up_blocks.", "up"), ("mid_block.", "mid"), ("attentions.", "a"),
                 ("transformer_blocks.", "t"), ("self_attn.", ""), (".attn2.", " ")):
        s = s.replace(a, b)
    return s


def _log_pos(v: float, lo: float = 1e-6, hi: float = 10.0) -> float:
    if not v or v != v or v <= 0:
        return 0.0
    v = min(max(v, lo), hi)
    return (math.log10(v) - math.log10(lo)) / (math.log10(hi) - math.log10(lo))


def render_rows(title: str, rows: list[dict], footer: str = ""):
    """rows: {"name", "delta_rel", optional "residual_before", "residual_after"} -> PIL image."""
    from PIL import Image, ImageDraw

    has_res = any(r.get("residual_after") is not None for r in rows)
    width = LEFT + BAR_W + NUM_W + (RES_W if has_res else 0) + 3 * PAD
    height = 3 * ROW + PAD * 2 + max(1, len(rows)) * ROW + (ROW if footer else 0)
    img = Image.new("RGB", (width, height), BG)
    d = ImageDraw.Draw(img)
    d.text((PAD, PAD), title[:110], fill=FG)
    y = PAD + ROW
    d.text((LEFT, y), "|dW|/|W|  (log, 1e-6 .. 10)", fill=DIM)
    if has_res:
        d.text((LEFT + BAR_W + NUM_W + PAD, y), "residual before -> after", fill=DIM)
    y += ROW + 4
    res_max = max([float(r.get("residual_before") or 0) for r in rows] +
                  [float(r.get("residual_after") or 0) for r in rows] + [1e-12])
    if not rows:
        d.text((PAD, y), "(the edit changed no weights)", fill=DIM)
    for r in rows:
        d.text((PAD, y + 2), short_name(r["name"])[:40], fill=FG)
        rel = r.get("delta_rel")
        frac = _log_pos(rel)
        d.rectangle([LEFT, y + 3, LEFT + BAR_W, y + ROW - 3], outline=(60, 64, 70))
        if frac > 0:
            d.rectangle([LEFT, y + 3, LEFT + int(frac * BAR_W), y + ROW - 3], fill=BAR)
        if rel is not None and rel == rel:
            d.text((LEFT + BAR_W + 6, y + 2), f"{rel:.2e}", fill=FG)
        if has_res and r.get("residual_after") is not None:
            x0 = LEFT + BAR_W + NUM_W + PAD
            rb = r.get("residual_before")
            ra = float(r.get("residual_after") or 0)
            half = (ROW - 6) // 2
            if rb is not None:
                d.rectangle([x0, y + 3, x0 + int(RES_W * 0.6 * float(rb) / res_max), y + 3 + half], fill=BEFORE)
            d.rectangle([x0, y + 3 + half, x0 + int(RES_W * 0.6 * ra / res_max), y + ROW - 3], fill=AFTER)
            label = f"{float(rb):.1e}>{ra:.1e}" if rb is not None else f"{ra:.1e}"
            d.text((x0 + int(RES_W * 0.62), y + 2), label, fill=FG)
        y += ROW
    if footer:
        d.text((PAD, y + 4), footer[:130], fill=DIM)
    return img


def to_comfy_image(img):
    import numpy as np
    import torch

    arr = np.asarray(img.convert("RGB"), dtype=np.float32) / 255.0
    return torch.from_numpy(arr).unsqueeze(0)
