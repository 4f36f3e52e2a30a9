"""AUTOMATIC1111 / Forge entry point: adds the Weightsmith tab.

A1111 imports every ``scripts/*.py`` of an extension by file. This file only makes the extension
folder importable as the package ``weightsmith`` (whatever the clone's folder is called) and
registers the tab; the code lives in ``a1111_extension/``.
"""

import importlib.util
import os
import sys

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _package():
    mod = sys.modules.get("weightsmith")
    if mod is not None:
        return mod
    spec = importlib.util.spec_from_file_location(
        "weightsmith", os.path.join(_ROOT, "__init__.py"), submodule_search_locations=[_ROOT]
    )
    mod = importlib.util.module_from_spec(spec)
    sys.modules["weightsmith"] = mod
    spec.loader.exec_module(mod)
    return mod


def _on_ui_tabs():
    _package()
    from weightsmith.a1111_extension.host import make_tab

    return make_tab()


try:
    from modules import script_callbacks
except ImportError:  # imported outside A1111/Forge (tests, tools): register nothing
    script_callbacks = None

if script_callbacks is not None:
    script_callbacks.on_ui_tabs(_on_ui_tabs)
