"""What every Weightsmith node shares: progress/cancel wiring, input parsing, reports.

Only ComfyUI's light modules are imported here; torch, diffusers, transformers and the core
solvers are imported inside the node functions, so ComfyUI starts fast.
"""
from __future__ import annotations

import contextlib
import logging
import json

CATEGORY = "Weightsmith"
EDIT_TYPE = "WEIGHTSMITH_EDIT"
STACK_TYPE = "WEIGHTSMITH_LORA_STACK"


def lines(text: str) -> list[str]:
    """One item per non-empty line (commas inside a line are kept: "a cat, in a hat")."""
    return [ln.strip() for ln in (text or "").splitlines() if ln.strip()]


def host_progress(total_hint: int = 1):
    """(progress, cancel) callables for core: ComfyUI's ProgressBar and its interrupt check."""
    import comfy.model_management as mm
    import comfy.utils

    bar = comfy.utils.ProgressBar(max(1, total_hint))
    last = [None]

    def progress(done: int, total: int, label: str = "") -> None:
        bar.update_absolute(int(done), int(total))
        if label and label != last[0]:      # ComfyUI's bar has no text: stage and time left go to the console
            last[0] = label
            logging.info("[Weightsmith] %d/%d %s", int(done), int(total), label)

    def cancel() -> bool:
        # raises ComfyUI's InterruptProcessingException when the user pressed Cancel
        mm.throw_exception_if_processing_interrupted()
        return False

    return progress, cancel


@contextlib.contextmanager
def user_errors():
    """Turn core's CancelledError into ComfyUI's interrupt; let WeightsmithError's message through."""
    from ..core.errors import CancelledError

    try:
        yield
    except CancelledError:
        import comfy.model_management as mm

        raise mm.InterruptProcessingException()


def options_of(cls, **kw):
    """A core options dataclass from node inputs, strictly (core.optspec.from_values: an unknown key
    is an error, None keeps the default)."""
    from ..core.optspec import from_values

    return from_values(cls, kw, where="Weightsmith node")


def widget(cls, name: str, kind: str, **extra):
    """A ComfyUI input declaration for core option ``name``: default, range and tooltip come from
    core's declaration (core.optspec), so the node cannot drift from the CLI and the A1111 tab."""
    from ..core.optspec import spec

    s = spec(cls, name)
    if kind == "choice":
        return (list(s.choices), {"default": s.default, "tooltip": s.help, **extra})
    opts = {"default": s.default, "tooltip": s.help}
    for key in ("lo", "hi", "step"):
        v = getattr(s, key)
        if v is not None:
            opts[{"lo": "min", "hi": "max", "step": "step"}[key]] = v
    return (kind, {**opts, **extra})


def format_report(edit, rel: dict[str, float], title: str) -> str:
    """A plain-text report: header, then one line per edited module."""
    rep = edit.report or {}
    head = [title]
    for k in ("method", "family", "targets", "anchors", "preserve", "stack", "strength", "iterations", "time_s"):
        if k in rep and rep[k] not in (None, [], ""):
            v = rep[k]
            head.append(f"{k}: {', '.join(map(str, v)) if isinstance(v, (list, tuple)) else v}")
    head.append(f"modules edited: {len(edit.deltas)}")
    stages = _stages(rep)
    body = []
    for name in sorted(edit.deltas, key=_order):
        s = stages.get(name, {})
        line = f"{name}: |dW|/|W| = {rel.get(name, float('nan')):.3e}"
        if s.get("residual_before") is not None:
            line += f", residual {s['residual_before']:.3e} -> {s['residual_after']:.3e}"
        elif s.get("residual_after") is not None:
            line += f", residual {s['residual_after']:.3e}"
        body.append(line)
    summary = rep.get("summary")
    tail = [f"summary: {json.dumps(summary, default=str)}"] if summary else []
    return "\n".join(head + [""] + body + tail)


def _stages(rep: dict) -> dict:
    """Per-module residuals from either report shape: erase ``stages`` (list of dicts with
    ``layer``, ``residual_before``/``after``) or merge ``residuals`` ({module: value})."""
    out = {s.get("layer"): s for s in rep.get("stages", []) if isinstance(s, dict)}
    res = rep.get("residuals")
    if isinstance(res, dict):
        for k, v in res.items():
            if isinstance(v, (int, float)):
                out.setdefault(k, {"residual_before": None, "residual_after": float(v)})
    return out


def _order(name: str):
    """Text encoder(s) first, then the UNet; layer numbers in numeric order."""
    import re

    comp = name.split(".", 1)[0]
    parts = [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", name)]
    return ({"text_encoder": 0, "text_encoder_2": 1, "unet": 2}.get(comp, 3), [(0, p) if isinstance(p, int) else (1, p) for p in parts])


def report_picture(edit, rel: dict[str, float], title: str):
    from .report_image import render_rows, to_comfy_image

    stages = _stages(edit.report or {})
    rows = []
    for name in sorted(edit.deltas, key=_order):
        s = stages.get(name, {})
        rows.append({"name": name, "delta_rel": rel.get(name),
                     "residual_before": s.get("residual_before"), "residual_after": s.get("residual_after")})
    t = (edit.report or {}).get("time_s")
    footer = f"{len(rows)} modules, {t} s" if t is not None else f"{len(rows)} modules"
    return to_comfy_image(render_rows(title, rows, footer))


def ui_text(text: str) -> dict:
    """The ``ui`` part of a node result; web/weightsmith.js shows it on the node."""
    return {"weightsmith_report": [text]}
