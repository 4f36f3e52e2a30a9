"""Weightsmith: closed-form weight editing for Stable Diffusion.

This file is both the Python package root (``import weightsmith``) and the ComfyUI entry point
(ComfyUI imports every folder in ``custom_nodes/`` through its ``__init__.py``). The node pack is
only loaded when ComfyUI is the host, so ``import weightsmith`` stays light everywhere else.
"""
__version__ = "0.1.0"
