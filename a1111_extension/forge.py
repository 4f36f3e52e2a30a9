"""Forge: the same tab, save-only.

Why no in-memory Apply: Forge does not run A1111's model objects (``cond_stage_model`` is None)
but ComfyUI-style patchers (``sd_model.forge_objects.unet``/``.clip``) that it rebuilds whenever
the LoRA set changes, dropping any patch we would add (docs/method.md, "Forge"). An edit applied there
would silently vanish at the next LoRA change, so the tab computes the edit from the loaded
checkpoint file and offers Save as LoRA (use it with ``<lora:NAME:1>``: Forge applies LoRAs
through its own patchers, which hold) and Save as checkpoint.
"""
from __future__ import annotations

import os
from pathlib import Path

from ..core.errors import require
from .backend import StandaloneBackend

APPLY_NOTE = ("Forge rebuilds its model patchers whenever the LoRA set changes, which would silently drop "
              "an in-memory edit. Save as LoRA and add <lora:NAME:1> to the prompt (Forge applies it "
              "reliably), or Save as checkpoint and load that.")


class ForgeBackend(StandaloneBackend):
    name = "forge"

    def __init__(self):
        from modules import shared

        self._shared = shared
        super().__init__("", "", "", can_apply=False, apply_note=APPLY_NOTE, name="forge")
        self._loaded_from = None

    def _checkpoint(self) -> Path:
        sm = self._shared.sd_model
        info = getattr(sm, "sd_checkpoint_info", None)
        fn = getattr(info, "filename", None)
        require(bool(fn) and os.path.isfile(fn),
                "no checkpoint file is loaded; pick a checkpoint at the top of the page first.")
        return Path(fn)

    def model(self):
        ck = self._checkpoint()
        if ck != self._loaded_from:
            self.model_path, self._model, self._loaded_from = ck, None, ck
        try:
            self._clip_skip = int(getattr(self._shared.opts, "CLIP_stop_at_last_layers", 1) or 1)
        except Exception:
            self._clip_skip = None
        return super().model()

    def model_key(self):
        return str(self._checkpoint())

    def describe(self) -> str:
        try:
            return super().describe()
        except Exception as e:  # noqa: BLE001
            return str(e)

    def lora_dir(self) -> Path:
        d = getattr(self._shared.cmd_opts, "lora_dir", None)
        if not d:
            from modules import paths
            d = os.path.join(paths.models_path, "Lora")
        return Path(d)

    def checkpoint_dir(self) -> Path:
        from modules import sd_models
        return Path(getattr(self._shared.cmd_opts, "ckpt_dir", None) or sd_models.model_path)

    def refresh_checkpoints(self) -> None:
        from modules import sd_models
        sd_models.list_models()

    def job(self, title: str):
        from .a1111 import state_job
        return state_job(self._shared.state, title, None)

    def interrupt(self) -> None:
        self._shared.state.interrupt()
