"""The AUTOMATIC1111 (v1.10) backend: the loaded model, its folders, progress and Interrupt.

Everything A1111-specific the tab touches is here (docs/method.md, "A1111"):

- ``modules.shared``: ``sd_model`` (``is_sdxl``/``is_sd2``/``is_sd1``/``is_sd3``,
  ``sd_checkpoint_info.filename``), ``state`` (``begin``/``end``/``interrupt``/``interrupted``,
  ``sampling_step(s)``, ``textinfo``), ``opts.CLIP_stop_at_last_layers``, ``cmd_opts.ckpt_dir``/
  ``lora_dir``.
- ``modules.sd_models``: ``read_state_dict``, ``list_models``, ``model_path``.
- ``modules.call_queue.queue_lock``: held while we compute or change weights, so no generation
  runs on half-edited weights.
- The Lora extension's per-layer backups (``network_weights_backup``/``network_bias_backup``/
  ``network_current_names``): see :mod:`.live_weights`.

Live modules → LDM checkpoint keys (the names :func:`weightsmith.core.naming.checkpoint_slot`
speaks): SD1 ``cond_stage_model.wrapped.transformer`` (HF CLIP) → ``cond_stage_model.transformer.``;
SD2 ``cond_stage_model.wrapped.model`` (OpenCLIP, fused ``in_proj``) → ``cond_stage_model.model.``;
SDXL ``conditioner.embedders[i].wrapped.{transformer|model}`` → ``conditioner.embedders.i.…``;
UNet ``model.diffusion_model`` → ``model.diffusion_model.``.

Two things the real A1111 does to the loaded model that the tab must undo or respect:

- ``modules/sd_hijack.py`` wraps every text encoder's token embedding in ``EmbeddingsWithFixes``
  (textual inversion), so the live parameter is ``…token_embedding.wrapped.weight``. Module paths
  are read without ``wrapped`` levels (:func:`_live_path`), giving the checkpoint's key.
- ``modules/processing.py`` keeps the last prompt's conditioning (the "Persistent cond cache",
  on by default: ``StableDiffusionProcessing.cached_c``/``cached_uc`` and txt2img's hires
  ``cached_hr_c``/``cached_hr_uc``), keyed on the prompt, checkpoint and settings but not on the
  weights. After every change of the weights in memory it is emptied
  (:func:`clear_cond_cache`), or the next image of the same prompt is still encoded by the old
  text encoder.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Mapping
from pathlib import Path

import torch

from ..core.errors import WeightsmithError, require
from ..core.naming import LDM_UNET_PREFIX as UNET_PREFIX
from ..core.naming import (
    SUPPORTED_FAMILIES,
    TE1,
    TE2,
    checkpoint_slot,
    family_label,
    sdxl_embedder_prefix,
    te_checkpoint_prefix,
)
from .backend import Backend
from .live_weights import Slot, lora_backup


def _unwrap(m):
    return getattr(m, "wrapped", m)


WRAPPER_LEVEL = "wrapped"


def _live_path(mname: str) -> str:
    """A live module path without host wrapper levels (``token_embedding.wrapped`` → ``token_embedding``)."""
    if WRAPPER_LEVEL not in mname.split("."):
        return mname
    return ".".join(p for p in mname.split(".") if p != WRAPPER_LEVEL)


COND_CACHES = (
    ("StableDiffusionProcessing", ("cached_c", "cached_uc")),
    ("StableDiffusionProcessingTxt2Img", ("cached_hr_c", "cached_hr_uc")),
)


def clear_cond_cache(processing=None) -> int:
    """Empty A1111's persistent conditioning caches in place (``[params, conds]`` lists shared by
    the class and every live processing object). Returns how many caches held something."""
    if processing is None:
        try:
            from modules import processing
        except Exception:  # noqa: BLE001  (not inside A1111: nothing is cached)
            return 0
    n = 0
    for cls_name, attrs in COND_CACHES:
        cls = getattr(processing, cls_name, None)
        for a in attrs:
            cache = getattr(cls, a, None)
            if isinstance(cache, list):
                n += any(x is not None for x in cache)
                cache[:] = [None] * len(cache)
    return n


def model_family(sd_model) -> str:
    """sd1 / sd2 / sdxl, or a WeightsmithError naming what is loaded."""
    require(sd_model is not None, "no model is loaded; pick a checkpoint at the top of the page first.")
    if getattr(sd_model, "is_sd3", False):
        raise WeightsmithError(
            f"the loaded model is SD3; Weightsmith edits {SUPPORTED_FAMILIES}. Load one of those checkpoints."
        )
    if getattr(sd_model, "is_sdxl", False):
        tx = text_embedders(sd_model)
        require(
            [k for k, _, _ in tx] == ["hf", "openclip"],
            "the loaded SDXL model is not an SDXL base (a refiner has only the bigG encoder); "
            "Weightsmith edits SDXL base models. Load an SDXL base checkpoint.",
        )
        return "sdxl"
    if getattr(sd_model, "cond_stage_model", None) is None:
        raise WeightsmithError(
            "the loaded model has no text encoder Weightsmith recognises (SD1.x, "
            "SD2.x or SDXL); load one of those checkpoints."
        )
    if getattr(sd_model, "is_sd2", False):
        return "sd2"
    inner = _unwrap(sd_model.cond_stage_model)
    if hasattr(inner, "transformer"):
        return "sd1"
    if hasattr(inner, "model"):
        return "sd2"
    raise WeightsmithError(
        f"the loaded model's text encoder is of an unknown kind; Weightsmith edits {SUPPORTED_FAMILIES}."
    )


def text_embedders(sd_model):
    """SDXL: [(kind, index, module)] for the text embedders of the conditioner."""
    out = []
    for i, e in enumerate(sd_model.conditioner.embedders):
        inner = _unwrap(e)
        if hasattr(inner, "transformer") and hasattr(inner, "tokenizer"):
            out.append(("hf", i, inner))
        elif hasattr(inner, "model") and hasattr(inner.model, "transformer"):
            out.append(("openclip", i, inner))
    return out


def live_roots(sd_model, family: str):
    """[(LDM key prefix, module, kind, component)]: where each part's weights live."""
    roots = []
    if family == "sdxl":
        tx = text_embedders(sd_model)
        hf = tx[0]
        oc = tx[1]
        roots.append((sdxl_embedder_prefix(hf[1], open_clip=False), hf[2].transformer, "hf", TE1))
        roots.append((sdxl_embedder_prefix(oc[1], open_clip=True), oc[2].model, "openclip", TE2))
    else:
        inner = _unwrap(sd_model.cond_stage_model)
        prefix, open_clip = te_checkpoint_prefix(family, TE1)
        roots.append((prefix, inner.model, "openclip", TE1) if open_clip else (prefix, inner.transformer, "hf", TE1))
    roots.append((UNET_PREFIX, sd_model.model.diffusion_model, "unet", "unet"))
    return roots


def _hf_name(path: str) -> str:
    # transformers 5.x has no ``text_model`` module in memory; files always say ``text_model.``
    if path.startswith(("text_model.", "text_model", "text_projection")) or path == "":
        return path
    return "text_model." + path


class LiveIndex:
    """LDM key -> (module, parameter name, parent MHA or None) for every live parameter."""

    def __init__(self, roots):
        self.entries: dict[str, tuple] = {}
        for prefix, root, kind, _ in roots:
            mods = dict(root.named_modules())
            for mname, mod in mods.items():
                key_path = _live_path(mname)
                parent = None
                if mname.endswith(".out_proj") or mname == "out_proj":
                    p = mods.get(mname.rpartition(".")[0]) if "." in mname else root
                    if isinstance(p, torch.nn.MultiheadAttention):
                        parent = p
                for pname, _ in mod.named_parameters(recurse=False):
                    path = f"{key_path}.{pname}" if key_path else pname
                    if kind == "hf":
                        path = _hf_name(path)
                    self.entries[prefix + path] = (mod, pname, parent)

    def base(self, key: str) -> torch.Tensor:
        """The tensor without LoRAs (the Lora extension's backup where it keeps one)."""
        mod, pname, parent = self.entries[key]
        if parent is not None:
            wb = getattr(parent, "network_weights_backup", None)
            if wb is not None and pname == "weight":
                return wb[1]
            bb = getattr(parent, "network_bias_backup", None)
            if bb is not None and pname == "bias":
                return bb
            return getattr(mod, pname)
        b = lora_backup(mod, pname)
        if b is not None:
            return b
        if (
            pname == "bias"
            and getattr(mod, "network_weights_backup", None) is not None
            and not isinstance(mod, torch.nn.MultiheadAttention)
        ):
            bb = getattr(mod, "network_bias_backup", None)
            if bb is not None:
                return bb
        return getattr(mod, pname)


class _BaseTensors(Mapping):
    """Read-only view of the base weights in LDM keys; tensors are copied to CPU on access."""

    def __init__(self, index: LiveIndex):
        self._index = index
        self._keys = list(index.entries)

    def __getitem__(self, key):
        return self._index.base(key).detach().to("cpu")

    def __iter__(self):
        return iter(self._keys)

    def __len__(self):
        return len(self._keys)


def _tokenizers(sd_model, family: str, roots) -> dict:
    from ..core.model_io import encoder_tokenizer
    from ..core.tokenizer import fit_tokenizer

    toks = {}
    for _, _, kind, comp in roots:
        if kind == "unet":
            continue
        tok = None
        if family == "sd1":
            tok = getattr(_unwrap(sd_model.cond_stage_model), "tokenizer", None)
        elif family == "sdxl":
            tok = getattr(text_embedders(sd_model)[0][2], "tokenizer", None)
        if tok is not None and hasattr(tok, "convert_tokens_to_ids"):
            toks[comp] = fit_tokenizer(tok, family, comp)
        else:  # SD2's open_clip tokenizer is not a transformers one: use CLIP's BPE from disk
            toks[comp] = encoder_tokenizer(None, family, comp)
    return toks


def _heads(roots) -> dict:
    out = {}
    for _, root, kind, comp in roots:
        if kind == "hf":
            out[comp] = int(root.config.num_attention_heads)
        elif kind == "openclip":
            mha = next(m for m in root.modules() if isinstance(m, torch.nn.MultiheadAttention))
            out[comp] = int(mha.num_heads)
    return out


def sdmodel_from_live(sd_model, clip_skip: int | None = None):
    """An SDModel (float32, CPU) of the loaded model's base weights, plus its LiveIndex. Where the
    web UI holds them in float32 on the CPU, the SDModel's parameters are those tensors themselves
    (no second copy: an SDXL model is ~14 GB); the backend drops it after every action and whenever
    it writes weights, and the generation lock keeps the Lora extension from writing meanwhile."""
    from ..core.model_io import model_from_state_dict

    family = model_family(sd_model)
    roots = live_roots(sd_model, family)
    index = LiveIndex(roots)
    te_sources = {comp: (prefix, kind == "openclip") for prefix, _, kind, comp in roots if kind != "unet"}
    model = model_from_state_dict(
        _BaseTensors(index),
        family,
        te_sources,
        UNET_PREFIX,
        _tokenizers(sd_model, family, roots),
        clip_skip=clip_skip if family != "sdxl" else None,
        te_heads=_heads(roots),
        share=True,
    )
    return model, index


@contextlib.contextmanager
def state_job(state, title: str, lock=None):
    """A long job the A1111 way: ``shared.state.begin/end`` around it, the generation lock held,
    progress in ``sampling_step(s)``/``textinfo``, Interrupt read from ``state.interrupted``."""
    with lock if lock is not None else contextlib.nullcontext():
        state.begin(job=title)
        state.job_count = 1
        try:

            def progress(done, total, label=""):
                state.sampling_steps = int(total)
                state.sampling_step = int(done)
                state.textinfo = f"{title}: {label}"

            yield progress, (lambda: bool(state.interrupted))
        finally:
            state.end()


# ----------------------------------------------------------------------------------------------
class WebUIHost:
    """What A1111 and Forge share: the generation lock, ``shared.state`` jobs and Interrupt, the
    Lora extension's list and folder. Needs ``self.shared`` (``modules.shared``)."""

    @staticmethod
    def _queue_lock():
        try:
            from modules import call_queue

            return call_queue.queue_lock
        except Exception:
            return contextlib.nullcontext()

    @contextlib.contextmanager
    def exclusive(self):
        with self._queue_lock():
            yield

    def job(self, title: str):
        return state_job(self.shared.state, title, self._queue_lock())

    def interrupt(self) -> None:
        self.shared.state.interrupt()

    def lora_dir(self) -> Path:
        """The webui's LoRA folder: --lora-dir, else models/Lora."""
        d = getattr(self.shared.cmd_opts, "lora_dir", None)
        if not d:
            from modules import paths

            d = os.path.join(paths.models_path, "Lora")
        return Path(d)

    def refresh_loras(self) -> None:
        try:
            import networks  # the built-in Lora extension's module

            networks.list_available_networks()
        except Exception:
            pass


#: what the tab says where a Flux.1 checkpoint is picked in AUTOMATIC1111 (docs/a1111.md, "Flux")
FLUX_MESSAGE = (
    "{name} is a Flux.1 model, and AUTOMATIC1111 does not load Flux models (it has no Flux support; the "
    "model in memory is not that one). Weightsmith erases on Flux in Forge and ComfyUI, and on the "
    "command line (weightsmith erase --model FILE --text-encoder clip_l.safetensors --text-encoder "
    "t5xxl.safetensors)."
)


class A1111Backend(WebUIHost, Backend):
    name = "a1111"

    def __init__(self):
        super().__init__()
        self._cache = None
        self._gen = 0

    # host modules, imported late (the tab module is imported before the model loads)
    @property
    def shared(self):
        from modules import shared

        return shared

    @property
    def sd_models(self):
        from modules import sd_models

        return sd_models

    def _flux_file(self) -> str | None:
        """The selected or loaded checkpoint's file when it is a Flux.1 model (from its keys), else None.
        AUTOMATIC1111 has no Flux support: picking one leaves the previous model loaded (or none)."""
        from ..core.flux_io import is_flux

        names = []
        title = getattr(getattr(self.shared, "opts", None), "sd_model_checkpoint", None)
        if title:
            match = getattr(self.sd_models, "get_closet_checkpoint_match", None)
            info = match(title) if match else getattr(self.sd_models, "checkpoints_list", {}).get(title)
            names.append(getattr(info, "filename", None))
        names.append(getattr(getattr(self.shared.sd_model, "sd_checkpoint_info", None), "filename", None))
        cache = self.__dict__.setdefault("_flux_seen", {})
        for fn in names:
            if fn and os.path.isfile(fn):
                if fn not in cache:
                    cache[fn] = is_flux(fn)
                if cache[fn]:
                    return fn
        return None

    def _sd_model(self):
        fn = self._flux_file()
        if fn:
            raise WeightsmithError(FLUX_MESSAGE.format(name=os.path.basename(fn)))
        sm = self.shared.sd_model
        require(sm is not None, "no model is loaded; pick a checkpoint at the top of the page first.")
        return sm

    def _clip_skip(self):
        try:
            return int(getattr(self.shared.opts, "CLIP_stop_at_last_layers", 1) or 1)
        except Exception:
            return None

    def model_key(self):
        sm = self.shared.sd_model
        info = getattr(sm, "sd_checkpoint_info", None)
        return (id(sm), getattr(info, "filename", None))

    def describe(self) -> str:
        fn = self._flux_file()
        if fn:
            return FLUX_MESSAGE.format(name=os.path.basename(fn))
        sm = self.shared.sd_model
        if sm is None:
            return "no model loaded"
        info = getattr(sm, "sd_checkpoint_info", None)
        try:
            fam = family_label(model_family(sm))
        except WeightsmithError as e:
            fam = f"not editable: {e}"
        return f"{getattr(info, 'title', None) or getattr(info, 'filename', '?')} ({fam})"

    def weights_changed(self) -> None:
        self._gen += 1
        self._cache = None
        clear_cond_cache()

    def idle(self) -> None:
        """After each tab action: drop the float32 CPU model (a copy as large as the loaded model
        where the web UI holds fp16 or GPU weights, views of its own tensors otherwise; it is
        rebuilt from the live weights in seconds at the next action)."""
        if self._cache is not None:
            self._cache = None
            import gc

            gc.collect()

    def _built(self):
        key = (self.model_key(), self._gen, self._clip_skip())
        if self._cache is None or self._cache[0] != key:
            self._cache = None
            model, index = sdmodel_from_live(self._sd_model(), self._clip_skip())
            self._cache = (key, model, index)
        return self._cache[1], self._cache[2]

    def model(self):
        return self._built()[0]

    def slots(self, names) -> dict[str, Slot]:
        model, index = self._built()
        hidden = {c: t.config.hidden_size for c, t in model.text_encoders.items()}
        out = {}
        for n in names:
            cs = checkpoint_slot(n + ".weight", model.family, model.layout, hidden)
            require(cs.key in index.entries, f"the loaded model has no weight {cs.key} for {n}.")
            mod, pname, parent = index.entries[cs.key]
            out[n] = Slot(mod, pname, cs.rows)
        return out

    # folders ----------------------------------------------------------------------------------
    def checkpoint_dir(self) -> Path:
        return Path(getattr(self.shared.cmd_opts, "ckpt_dir", None) or self.sd_models.model_path)

    def checkpoint_file(self) -> Path:
        info = getattr(self._sd_model(), "sd_checkpoint_info", None)
        fn = getattr(info, "filename", None)
        require(
            fn and os.path.isfile(fn),
            "the loaded model's checkpoint file was not found on disk, so it "
            "cannot be saved with the edit; save as LoRA instead.",
        )
        return Path(fn)

    def save_checkpoint(self, deltas, out, metadata):
        from ..core.model_io import add_deltas_to_ldm_state, atomic_save_file

        src = self.checkpoint_file()
        require(Path(out).resolve() != src.resolve(), "choose a new name; the loaded checkpoint is kept as it is.")
        model = self.model()
        sd = self.sd_models.read_state_dict(str(src))
        add_deltas_to_ldm_state(sd, deltas, model, f"the checkpoint file {src.name} (changed on disk?)")
        sd = {k: v.detach().to("cpu").contiguous() for k, v in sd.items() if isinstance(v, torch.Tensor)}
        atomic_save_file(sd, Path(out), metadata)
        return Path(out)

    def refresh_checkpoints(self) -> None:
        self.sd_models.list_models()
