"""Forge (v2, the patcher system of August 2024 on): the same tab, with Apply and Undo through
Forge's own model patchers (docs/a1111.md, "Forge").

Forge does not run A1111's model objects (``cond_stage_model`` is None) but ComfyUI-style patchers:
``sd_model.forge_objects.unet`` / ``.clip``. Before every batch it resets ``forge_objects`` to
``forge_objects_original``, and whenever the LoRA set changes it rebuilds the LoRA patchers as
clones *of the original* (``networks.load_networks``). So a patch on ``forge_objects`` itself would
vanish at the next generation; a patch on clones installed *as* ``forge_objects_original`` stays,
and every LoRA clone made from them carries it. That is what :meth:`ForgeBackend.attach` does:

- the edit becomes ``("diff", (ΔW,))`` patches (:func:`~weightsmith.core.edit.patcher_patches`,
  reshaped to each parameter) under the identifier ``weightsmith:<serial>``, added with
  ``add_patches(filename=…, strength_patch=1, strength_model=1)`` to clones of the original UNet and
  CLIP patchers; every key must be accepted, or nothing changes;
- the clones become ``forge_objects_original`` (and ``forge_objects``, ``…_after_applying_lora``);
  ``current_lora_hash`` is set to a value Forge never computes, so the next generation re-stacks
  the prompt's LoRAs on top (ours comes first in each weight's patch list: W + ΔW + LoRAs, as if
  the edit were in the checkpoint); the serial changes each time, so Forge re-merges the weights;
- the persistent conditioning cache is emptied (it is keyed on the prompt, not the weights).

Undo installs the same clones without our patch: at the next generation Forge restores its own
backups of the original weights. A new engine for the same checkpoint (Forge rebuilds one when
settings change) gets the edit again from a ``model_loaded`` callback; another checkpoint does not.
Apply before the first generation (Forge loads lazily) is kept and installed when the model loads.
Save as LoRA / checkpoint compute from the checkpoint file, as before.

Flux.1 (docs/flux.md, "Flux in ComfyUI and Forge"): Forge's Flux engine holds the same patchers with
ComfyUI's keys (``diffusion_model.double_blocks…``, ``clip_l.transformer.text_model…``,
``t5xxl.transformer.encoder…``). The tab's model is read from the checkpoint (BFL transformer file or
all-in-one checkpoint) plus the text-encoder files Forge loads beside it ("VAE / Text Encoder"), by
:func:`~weightsmith.core.flux_io.load_flux`; the edit goes on the patchers as
:func:`~weightsmith.core.flux_host.host_patches`; Save as LoRA writes the Flux LoRA (+ T5 file), Save as
checkpoint the input's own layout (:func:`~weightsmith.core.flux_io.save_flux_edit`). That model sits beside Forge's
own: for an SDXL file stored in half precision its UNet is held in that precision (computed in
float32, the same results bit for bit; :func:`~weightsmith.core.model_io.beside_host_weights_dtype`).
"""

from __future__ import annotations

import inspect
import itertools
import os
from pathlib import Path

from ..core.edit import check_patches_accepted, patcher_patches
from ..core.errors import WeightsmithError, require
from ..core.model_io import beside_host_weights_dtype
from ..core.naming import family_label
from .a1111 import WebUIHost, clear_cond_cache
from .backend import StandaloneBackend

PATCH_PREFIX = "weightsmith:"
_REBUILD_HASH = "weightsmith: rebuild the LoRA stack"
_serial = itertools.count(1)
_active: list = []  # the backend the model_loaded callback serves (the last one built)
_registered_with: list = []  # the script_callbacks module it is registered with (once per host)


def _on_model_loaded(sd_model) -> None:
    if _active:
        _active[-1].model_loaded(sd_model)


def _register(backend) -> None:
    from modules import script_callbacks

    _active[:] = [backend]
    if not any(m is script_callbacks for m in _registered_with):
        script_callbacks.on_model_loaded(_on_model_loaded)
        _registered_with.append(script_callbacks)


def engine_family(sd_model) -> str | None:
    """sd1 / sd2 / sdxl of a Forge engine, None for the engines Weightsmith does not edit (Flux, SD3…)."""
    for fam in ("sdxl", "sd2", "sd1"):
        if getattr(sd_model, f"is_{fam}", False):
            return fam
    return None


def engine_is_flux(sd_model) -> bool:
    """Whether a loaded Forge engine runs a Flux transformer (from its UNet patcher's keys)."""
    from ..core.flux_host import is_flux_state

    unet = getattr(getattr(sd_model, "forge_objects_original", None), "unet", None)
    model = getattr(unet, "model", None)
    if model is None:
        return False
    return is_flux_state([k for k, _ in model.named_parameters()])


def _is_loaded(sd_model) -> bool:
    return getattr(sd_model, "forge_objects_original", None) is not None


class ForgeBackend(WebUIHost, StandaloneBackend):
    name = "forge"

    def __init__(self):
        from modules import shared

        self.shared = shared
        super().__init__("", "", "", name="forge")
        self._loaded_from = None
        self._edit = None  # the edit kept installed (None: none)
        self._edit_key = None  # the model_key it belongs to
        self.installed_on = None  # the engine object it is installed on (None: pending / none)
        _register(self)

    # model ------------------------------------------------------------------------------------
    def _loading_parameters(self) -> dict:
        from modules import sd_models

        md = getattr(sd_models, "model_data", None)
        return dict(getattr(md, "forge_loading_parameters", None) or {})

    def _checkpoint(self) -> Path:
        info = getattr(self.shared.sd_model, "sd_checkpoint_info", None)
        if info is None:  # Forge loads the model at the first generation; until then it is selected
            info = self._loading_parameters().get("checkpoint_info")
        fn = getattr(info, "filename", None)
        require(
            bool(fn) and os.path.isfile(fn),
            "no checkpoint file is loaded; pick a checkpoint at the top of the page first.",
        )
        return Path(fn)

    def _text_encoder_modules(self) -> list[str]:
        """The separate text-encoder files Forge loads beside the checkpoint ("VAE / Text Encoder")."""
        out = []
        for m in self._loading_parameters().get("additional_modules") or []:
            parts = {p.lower() for p in Path(str(m)).parts}
            if "text_encoder" in parts or "text_encoders" in parts:
                out.append(str(m))
        return out

    def _is_flux_file(self, ck) -> bool:
        from ..core.flux_io import is_flux

        if getattr(self, "_flux_checked", (None, None))[0] != ck:
            self._flux_checked = (ck, is_flux(ck))
        return self._flux_checked[1]

    def model(self):
        ck = self._checkpoint()
        if self._is_flux_file(ck):
            key = self.model_key()
            if self._model is None or self._loaded_from != key:
                from ..core.flux_io import load_flux

                self.model_path, self._model = ck, None
                self._model = load_flux(ck, self._text_encoder_modules())
                self._loaded_from = key
            return self._model
        if ck != self._loaded_from:
            self.model_path, self._model, self._loaded_from = ck, None, ck
            self._weights_dtype = beside_host_weights_dtype(ck)  # SDXL beside Forge's own copy
        try:
            self._clip_skip = int(getattr(self.shared.opts, "CLIP_stop_at_last_layers", 1) or 1)
        except Exception:
            self._clip_skip = None
        return super().model()

    def model_key(self):
        return self._key(self._checkpoint())

    def _key(self, checkpoint) -> str:
        """The checkpoint with the separate modules Forge loads beside it: what an edit belongs to."""
        extra = self._loading_parameters().get("additional_modules") or []
        return str(Path(checkpoint)) + "".join(f" + {os.path.basename(str(m))}" for m in extra)

    def describe(self) -> str:
        try:
            return super().describe()
        except Exception as e:  # noqa: BLE001
            return str(e)

    # apply / undo through Forge's patchers ------------------------------------------------------
    def attach(self, edit) -> None:
        """Keep ``edit`` (the whole applied edit, already scaled) installed on the loaded model."""
        te = self._text_encoder_modules()
        flux = self._is_flux_file(self._checkpoint())  # Flux: the text-encoder files are read too
        require(
            flux or not te,
            f"Forge loads a separate text encoder ({os.path.basename(te[0]) if te else ''}) beside "
            "the checkpoint, and Weightsmith computes edits from the checkpoint's own: clear it under "
            "'VAE / Text Encoder' at the top of the page, or use Save as LoRA.",
        )
        sm = self.shared.sd_model
        key = self.model_key()
        if _is_loaded(sm):
            self._install(sm, edit)  # raises before changing anything when a key does not fit
        self._edit, self._edit_key = edit, key
        self.installed_on = sm if _is_loaded(sm) else None

    def detach(self) -> None:
        """Take the edit off the loaded model (Forge restores its weight backups at the next generation)."""
        sm = self.installed_on
        self._edit = self._edit_key = self.installed_on = None
        if sm is not None and sm is self.shared.sd_model:
            self._install(sm, None)

    def forget(self) -> None:
        """The model the edit belonged to is gone: keep nothing for it."""
        self._edit = self._edit_key = self.installed_on = None

    def model_loaded(self, sd_model) -> None:
        """``script_callbacks.on_model_loaded``: a new engine for the model the edit belongs to gets it
        (Forge builds a fresh engine when its loading parameters change, and loads lazily)."""
        if self._edit is None or not _is_loaded(sd_model):
            return
        info = getattr(sd_model, "sd_checkpoint_info", None)
        if self._key(getattr(info, "filename", "") or "") != self._edit_key:
            return
        self._install(sd_model, self._edit)
        self.installed_on = sd_model

    def _install(self, sm, edit) -> None:
        fam = "flux" if engine_is_flux(sm) else engine_family(sm)
        if fam is None:
            raise WeightsmithError(
                "the loaded model is not SD1.x, SD2.x, SDXL or Flux.1; Weightsmith edits only those. "
                "Nothing was changed."
            )
        o = sm.forge_objects_original
        unet, clip = o.unet.clone(), o.clip.clone()
        for patcher in (unet, clip.patcher):
            for ident in [i for i in patcher.lora_patches if str(i[0]).startswith(PATCH_PREFIX)]:
                del patcher.lora_patches[ident]
        if edit is not None:
            require(
                edit.family == fam,
                f"this edit is for {family_label(edit.family)} but the loaded model is "
                f"{family_label(fam)}; nothing was changed.",
            )
            shapes = {k: p.shape for k, p in unet.model.named_parameters()}
            shapes.update({k: p.shape for k, p in clip.patcher.model.named_parameters()})
            if fam == "flux":
                from ..core.flux_host import host_patches

                unet_p, clip_p = host_patches(edit, shapes)
            else:
                unet_p, clip_p = patcher_patches(edit, shapes)
            name = f"{PATCH_PREFIX}{next(_serial)}"
            for patcher, patches, what in ((unet, unet_p, "UNet"), (clip.patcher, clip_p, "text encoder")):
                if not patches:
                    continue
                if "filename" not in inspect.signature(patcher.add_patches).parameters:
                    raise WeightsmithError(
                        "this Forge is older than the patcher rework of August 2024; update "
                        "Forge, or use Save as LoRA. Nothing was changed."
                    )
                got = patcher.add_patches(
                    filename=name, patches=patches, strength_patch=1.0, strength_model=1.0, online_mode=self._online(sm)
                )
                check_patches_accepted(patches, got, "Forge", what)
        o.unet, o.clip = unet, clip
        sm.forge_objects_after_applying_lora = o.shallow_copy()
        sm.forge_objects = o.shallow_copy()
        sm.current_lora_hash = _REBUILD_HASH
        clear_cond_cache()

    @staticmethod
    def _online(sm) -> bool:
        """Forge's own rule for LoRAs (networks.load_networks): merge into the weights unless they
        are stored quantised (fp8 / nf4 / gguf) and the online-LoRA option is on."""
        import torch

        try:
            from backend.args import dynamic_args

            online = bool(dynamic_args.get("online_lora", False))
        except Exception:  # noqa: BLE001
            online = False
        dt = getattr(getattr(sm.forge_objects.unet, "model", None), "storage_dtype", torch.float32)
        return online and dt not in (torch.float32, torch.float16, torch.bfloat16)

    # files ------------------------------------------------------------------------------------
    def checkpoint_dir(self) -> Path:
        from modules import sd_models

        return Path(getattr(self.shared.cmd_opts, "ckpt_dir", None) or sd_models.model_path)

    def refresh_checkpoints(self) -> None:
        from modules import sd_models

        sd_models.list_models()

    def refresh_loras(self) -> None:
        """After the tab wrote a LoRA. Forge caches every LoRA file's tensors by path
        (``networks.load_lora_state_dict``, an lru_cache), re-stacks LoRAs only when the prompt's set of
        paths and weights changes (``current_lora_hash``), and re-merges weights only when the patch
        names change (each model's ``lora_loader.loaded_hash``): a file written under a path Forge has
        read before (one the user deleted, then saved again) would keep its old weights. Drop the cache
        and make the next generation re-stack and re-merge."""
        super().refresh_loras()
        try:
            import networks

            networks.load_lora_state_dict.cache_clear()
        except Exception:  # noqa: BLE001  (no such cache in this Forge: nothing to drop)
            pass
        sm = getattr(self.shared, "sd_model", None)
        if sm is None or not _is_loaded(sm):
            return
        sm.current_lora_hash = _REBUILD_HASH
        o = sm.forge_objects_original
        for patcher in (getattr(o, "unet", None), getattr(getattr(o, "clip", None), "patcher", None)):
            loader = getattr(getattr(patcher, "model", None), "lora_loader", None)
            if loader is not None and hasattr(loader, "loaded_hash"):
                loader.loaded_hash = _REBUILD_HASH
