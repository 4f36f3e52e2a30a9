"""Pick the backend for the running web UI and build the tab (called from scripts/weightsmith_tab.py)."""

from __future__ import annotations

import importlib.util


def is_forge() -> bool:
    return importlib.util.find_spec("modules_forge") is not None


def make_backend():
    if is_forge():
        from .forge import ForgeBackend

        return ForgeBackend()
    from .a1111 import A1111Backend

    return A1111Backend()


def make_tab():
    """``script_callbacks.on_ui_tabs`` result: ``[(gr.Blocks, title, elem_id)]``."""
    from .ui import build_ui

    return [(build_ui(make_backend()), "Weightsmith", "weightsmith")]
