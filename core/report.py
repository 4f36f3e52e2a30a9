"""The report of an edit, one model for every front end: rows, text, table and picture.

A row per edited module, in one order (text encoder(s) first, then the UNet, layer numbers
numerically): ``name``, ``stage``, ``delta_fro`` = ‖ΔW‖_F, ``delta_rel`` = ‖ΔW‖_F/‖W‖_F (W the
weight the edit was computed from), ``residual_before``/``residual_after`` where the solver
reported them — erase stages and merge residuals alike (docs/method.md, "Erase report"). An erase
report adds one line per hardening round (:func:`hardening_lines`, docs/method.md, "Hardening
rounds"). The ComfyUI nodes show :func:`text` and :func:`edit_picture`; the A1111 tab shows
:func:`table` and :func:`edit_picture`. The picture is drawn with PIL only.
"""

from __future__ import annotations

import json
import math
import re

TABLE_HEADERS = ["layer", "stage", "‖ΔW‖_F", "‖ΔW‖/‖W‖", "residual before", "residual after"]
_HEAD_KEYS = ("method", "family", "targets", "anchors", "preserve", "stack", "strength", "iterations", "time_s")


def order(name: str):
    """Sort key: text encoder(s) first, then the UNet; layer numbers in numeric order."""
    comp = name.split(".", 1)[0]
    parts = [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", name)]
    return (
        {"text_encoder": 0, "text_encoder_2": 1, "unet": 2}.get(comp, 3),
        [(0, p) if isinstance(p, int) else (1, p) for p in parts],
    )


def relative_changes(edit, model) -> dict[str, float]:
    """‖ΔW‖/‖W‖ per edited module, W = ``model.weight(name)`` (nan where the model lacks it)."""
    out = {}
    for name, d in edit.deltas.items():
        try:
            w = float(model.weight(name).float().cpu().norm())
            out[name] = float(d.float().cpu().norm()) / max(w, 1e-12)
        except Exception:
            out[name] = float("nan")
    return out


def _residuals(rep: dict) -> dict:
    """Per-module residuals from either report shape: erase ``stages`` (dicts with ``layer``,
    ``stage``, ``residual_before``/``after``) or merge ``residuals`` ({module: value})."""
    out = {s.get("layer"): s for s in rep.get("stages", []) if isinstance(s, dict)}
    res = rep.get("residuals")
    if isinstance(res, dict):
        for k, v in res.items():
            if isinstance(v, (int, float)):
                out.setdefault(k, {"residual_before": None, "residual_after": float(v)})
    return out


def _num(x):
    return None if x is None else float(x)


def rows(edit, rel: dict[str, float]) -> list[dict]:
    """One row per edited module (see the module docstring), ``rel`` from :func:`relative_changes`."""
    res = _residuals(edit.report or {})
    out = []
    for name in sorted(edit.deltas, key=order):
        s = res.get(name, {})
        out.append(
            {
                "name": name,
                "stage": s.get("stage", name.split(".", 1)[0]),
                "delta_fro": float(edit.deltas[name].float().norm()),
                "delta_rel": rel.get(name),
                "residual_before": _num(s.get("residual_before")),
                "residual_after": _num(s.get("residual_after")),
            }
        )
    return out


def text(edit, rows: list[dict], title: str) -> str:
    """A plain-text report: header (method, concepts, time ...), then one line per module."""
    rep = edit.report or {}
    head = [title]
    for k in _HEAD_KEYS:
        if k in rep and rep[k] not in (None, [], ""):
            v = rep[k]
            head.append(f"{k}: {', '.join(map(str, v)) if isinstance(v, (list, tuple)) else v}")
    head.append(f"modules edited: {len(edit.deltas)}")
    head += block_lines(rep)
    body = []
    for r in rows:
        rel = r["delta_rel"]
        line = f"{r['name']}: |dW|/|W| = {float('nan') if rel is None else rel:.3e}"
        if r["residual_before"] is not None:
            line += f", residual {r['residual_before']:.3e} -> {r['residual_after']:.3e}"
        elif r["residual_after"] is not None:
            line += f", residual {r['residual_after']:.3e}"
        body.append(line)
    summary = rep.get("summary")
    tail = [f"summary: {json.dumps(summary, default=str)}"] if summary else []
    hard = hardening_lines(rep)
    return "\n".join(head + [""] + body + ([""] + hard if hard else []) + tail)


def _f3(x) -> str:
    return "n/a" if x is None else f"{float(x):.3f}"


def hardening_lines(rep: dict) -> list[str]:
    """The erase report's ``hardening_summary`` as text, a heading and one line per round (docs/method.md,
    "Hardening rounds"): the UNet stage's adversarial residual (1 = an adversary's closed-form input
    reaches the target as well as on the unedited model, 0 = no closer than the anchor), the worst over
    stages, and the largest ‖ΔW‖/‖W‖ and preserve residual of any stage. Empty for other reports."""
    summ = rep.get("hardening_summary") or []
    if not summ:
        return []
    out = ["hardening: adversarial residual (unet; worst stage), max |dW|/|W|, max preserve residual"]
    for s in summ:
        out.append(
            f"round {s['round']}: adversarial residual {_f3(s['adv_residual_unet'])}; worst "
            f"{_f3(s['adv_residual_max'])} of {s['stages']} stages; |dW|/|W| {_f3(s['delta_rel_max'])}; "
            f"preserve residual {_f3(s['preserve_residual_max'])}"
        )
    return out


def block_lines(rep: dict) -> list[str]:
    """The weight each block got, one line per LoRA merged with block weights (docs/merge.md, "Block
    weights"): ``block weights: NAME [SPEC]: BASE 1, IN01 0, ...`` (``-``: modules in no block, weight 1)."""
    from .blockweights import summary_line

    return [
        f"block weights: {summary_line(d.get('name'), d['blocks'])}"
        for d in rep.get("loras") or []
        if isinstance(d, dict) and d.get("blocks")
    ]


def table(rows: list[dict]) -> list[list]:
    """The rows as a table under :data:`TABLE_HEADERS` (6 significant digits)."""

    def r6(x):
        return None if x is None or x != x else round(float(x), 6)

    return [
        [
            r["name"],
            r["stage"],
            r6(r["delta_fro"]),
            r6(r["delta_rel"]),
            r6(r["residual_before"]),
            r6(r["residual_after"]),
        ]
        for r in rows
    ]


def footer(edit, n: int) -> str:
    t = (edit.report or {}).get("time_s")
    return f"{n} modules, {t} s" if t is not None else f"{n} modules"


# -- picture -------------------------------------------------------------------------------------
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
    for a, b in (
        ("unet.", "U "),
        ("text_encoder_2.text_model.encoder.layers.", "TE2 L"),
        ("text_encoder.text_model.encoder.layers.", "TE L"),
        ("down_blocks.", "down"),
        ("up_blocks.", "up"),
        ("mid_block.", "mid"),
        ("attentions.", "a"),
        ("transformer_blocks.", "t"),
        ("self_attn.", ""),
        (".attn2.", " "),
    ):
        s = s.replace(a, b)
    return s


def _log_pos(v: float, lo: float = 1e-6, hi: float = 10.0) -> float:
    if not v or v != v or v <= 0:
        return 0.0
    v = min(max(v, lo), hi)
    return (math.log10(v) - math.log10(lo)) / (math.log10(hi) - math.log10(lo))


def edit_picture(edit, rows: list[dict], title: str):
    """:func:`picture` of an edit as every host shows it: its rows, the footer and the hardening lines."""
    return picture(rows, title, footer(edit, len(rows)), hardening=hardening_lines(edit.report or {}))


def picture(rows: list[dict], title: str, footer: str = "", hardening: list[str] | None = None):
    """The rows as a PIL image: a log-scale bar of ‖ΔW‖/‖W‖ per module and, where reported, the
    residual before → after (one 16-pixel row per module); then the ``hardening`` lines
    (:func:`hardening_lines`), one text row each."""
    from PIL import Image, ImageDraw

    hardening = list(hardening or [])
    has_res = any(r.get("residual_after") is not None for r in rows)
    width = LEFT + BAR_W + NUM_W + (RES_W if has_res else 0) + 3 * PAD
    height = 3 * ROW + PAD * 2 + max(1, len(rows)) * ROW + (ROW if footer else 0)
    height += (len(hardening) * ROW + 4) if hardening else 0
    img = Image.new("RGB", (width, height), BG)
    d = ImageDraw.Draw(img)
    d.text((PAD, PAD), title[:110], fill=FG)
    y = PAD + ROW
    d.text((LEFT, y), "|dW|/|W|  (log, 1e-6 .. 10)", fill=DIM)
    if has_res:
        d.text((LEFT + BAR_W + NUM_W + PAD, y), "residual before -> after", fill=DIM)
    y += ROW + 4
    res_max = max(
        [float(r.get("residual_before") or 0) for r in rows]
        + [float(r.get("residual_after") or 0) for r in rows]
        + [1e-12]
    )
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
    if hardening:
        y += 4
        for k, line in enumerate(hardening):
            d.text((PAD, y + 2), line[:130], fill=DIM if k == 0 else FG)
            y += ROW
    if footer:
        d.text((PAD, y + 4), footer[:130], fill=DIM)
    return img
