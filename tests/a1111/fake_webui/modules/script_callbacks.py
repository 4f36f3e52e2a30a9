"""modules.script_callbacks (A1111 v1.10): on_ui_tabs registration."""

ui_tabs = []


def on_ui_tabs(callback):
    """callback() -> list of (gr.Blocks, title, elem_id)."""
    ui_tabs.append(callback)


def ui_tabs_callback():
    res = []
    for cb in ui_tabs:
        res += cb() or []
    return res
