"""Weightsmith: closed-form weight editing for Stable Diffusion.

This file is both the Python package root (``import weightsmith``) and the ComfyUI entry point
(ComfyUI imports every folder in ``custom_nodes/`` through its ``__init__.py``). The node pack is
only loaded when ComfyUI is the host, so ``import weightsmith`` stays light everywhere else.
"""

import sys as _sys

from .core import __version__  # noqa: F401  (one version, defined in core)


def _inside_comfyui() -> bool:
    # ComfyUI has imported its own ``folder_paths`` and ``comfy`` before it loads custom nodes.
    return "folder_paths" in _sys.modules and "comfy" in _sys.modules


if _inside_comfyui():
    from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS  # noqa: F401

    WEB_DIRECTORY = "./web"
    __all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS", "WEB_DIRECTORY"]
