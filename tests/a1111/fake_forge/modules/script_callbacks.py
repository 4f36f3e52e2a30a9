"""modules.script_callbacks (Forge 2.0.1v1.10.1): tabs and model_loaded; like Forge, a failing
callback is reported on the console and swallowed."""

import traceback

ui_tabs = []
model_loaded = []


def on_ui_tabs(callback, *, name=None):
    ui_tabs.append(callback)


def on_model_loaded(callback, *, name=None):
    model_loaded.append(callback)


def ui_tabs_callback():
    res = []
    for cb in ui_tabs:
        res += cb() or []
    return res


def model_loaded_callback(sd_model):
    for cb in model_loaded:
        try:
            cb(sd_model)
        except Exception:  # noqa: BLE001  (Forge: report_exception, generation goes on)
            traceback.print_exc()
