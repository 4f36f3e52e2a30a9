"""What every Weightsmith node shares: progress/cancel wiring, input parsing, reports.

Only ComfyUI's light modules are imported here; torch, diffusers, transformers and the core
solvers are imported inside the node functions, so ComfyUI starts fast.
"""

from __future__ import annotations

import contextlib
import logging
import time

CATEGORY = "Weightsmith"
EDIT_TYPE = "WEIGHTSMITH_EDIT"
STACK_TYPE = "WEIGHTSMITH_LORA_STACK"
# what every editing node returns (Erase Concepts, IterIS Merge)
EDIT_RETURN_TYPES = ("MODEL", "CLIP", EDIT_TYPE, "STRING", "IMAGE")
EDIT_RETURN_NAMES = ("model", "clip", "edit", "report", "report_image")


def host_progress(total_hint: int = 1):
    """(progress, cancel) callables for core: ComfyUI's ProgressBar and its interrupt check."""
    import comfy.model_management as mm
    import comfy.utils

    bar = comfy.utils.ProgressBar(max(1, total_hint))
    last = [None]

    def progress(done: int, total: int, label: str = "") -> None:
        bar.update_absolute(int(done), int(total))
        if label and label != last[0]:  # ComfyUI's bar has no text: stage and time left go to the console
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

        raise mm.InterruptProcessingException() from None


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
    """The report as text (core.report: the same rows the A1111 tab shows)."""
    from ..core import report

    return report.text(edit, report.rows(edit, rel), title)


def report_picture(edit, rel: dict[str, float], title: str):
    """The report picture (core.report.picture) as a ComfyUI IMAGE."""
    from ..core import report
    from .report_image import to_comfy_image

    rows = report.rows(edit, rel)
    return to_comfy_image(report.edit_picture(edit, rows, title))


def ui_text(text: str) -> dict:
    """The ``ui`` part of a node result; web/weightsmith.js shows it on the node."""
    return {"weightsmith_report": [text]}


def edit_result(model, clip, sd, edit, title: str, t0: float) -> dict:
    """The end of every editing node: the edit moved to CPU float32 (a WEIGHTSMITH_EDIT outlives the
    solver's device copy), applied as patches on clones of MODEL/CLIP, its report as text and picture."""
    import torch

    from . import comfy_adapter as ca

    edit = edit.to("cpu", torch.float32)
    if edit.family == "flux":  # Save Edit as LoRA writes a T5 change into a T5 file: it needs the base T5
        from ..core.flux_host import t5_base

        edit.host_t5_base = t5_base(sd)
    logging.info("Weightsmith: %d modules edited in %.1f s", len(edit.deltas), time.perf_counter() - t0)
    m, c = ca.apply_edit(model, clip, edit, 1.0)
    rel = ca.weight_norms(sd, edit)
    text = format_report(edit, rel, title)
    image = report_picture(edit, rel, title)
    return {"ui": ui_text(text), "result": (m, c, edit, text, image)}
