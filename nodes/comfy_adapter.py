"""ComfyUI MODEL/CLIP <-> Weightsmith core (docs/method.md, "ComfyUI").

- :func:`sdmodel_from_comfy` reads the *effective* weights of a ComfyUI ``ModelPatcher`` and
  ``CLIP`` (the checkpoint plus every patch already on them, e.g. LoRAs applied upstream) and
  builds a core :class:`~weightsmith.core.sdmodel.SDModel` with
  :func:`~weightsmith.core.model_io.model_from_state_dict`. Nothing is copied until a weight is
  read: UNet weights are fetched one by one when a solver asks for them.
- :func:`apply_edit` puts an :class:`~weightsmith.core.edit.Edit` (mapped to ComfyUI state-dict keys by
  :func:`~weightsmith.core.edit.patcher_patches`) as ``("diff", (ΔW,))`` patches on *clones* of the
  inputs, and checks that ComfyUI accepted every key (``add_patches`` silently ignores unknown ones).

ComfyUI keys: UNet ``diffusion_model.<ldm path>``; text encoders in transformers format
``clip_l.transformer.text_model.…`` (SD1, SDXL's CLIP-L), ``clip_h.transformer.…`` (SD2, q/k/v
already split), ``clip_g.transformer.…`` (SDXL's bigG).

Flux.1 (docs/flux.md, "Flux in ComfyUI and Forge"): a MODEL whose keys are a Flux transformer's
(``diffusion_model.double_blocks.…``, from UNETLoader or CheckpointLoaderSimple) with a CLIP holding
``clip_l`` and ``t5xxl`` (DualCLIPLoader type flux, or the checkpoint's) is read by
:func:`flux_from_comfy` into core's :class:`~weightsmith.core.fluxmodel.FluxModel` over the same
effective weights, and an edit goes back as patches by :func:`~weightsmith.core.flux_host.host_patches`.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch

from ..core.edit import check_patches_accepted, patcher_patches
from ..core.errors import WeightsmithError
from ..core.naming import COMFY_TE_ATTRS as TE_PREFIXES
from ..core.naming import COMFY_UNET_PREFIX as UNET_PREFIX
from ..core.naming import SUPPORTED_FAMILIES

FAMILY_BY_CONFIG = {
    "SD15": "sd1",
    "SD20": "sd2",
    "SD21UnclipL": "sd2",
    "SD21UnclipH": "sd2",
    "SDXL": "sdxl",
    "SSD1B": "sdxl",
    "Segmind_Vega": "sdxl",
    "KOALA_700M": "sdxl",
    "KOALA_1B": "sdxl",
}


# ----------------------------------------------------------------------------------------------
# effective weights
def _calculate_weight(patcher, patches, weight, key):
    try:
        import comfy.lora

        if hasattr(comfy.lora, "calculate_weight"):
            return comfy.lora.calculate_weight(patches, weight, key)
    except ImportError:  # pragma: no cover - very old ComfyUI
        pass
    return patcher.calculate_weight(patches, weight, key)


def effective_weight(patcher, key: str, entry) -> torch.Tensor:
    """One weight as the sampler will see it, from a ``get_key_patches()`` entry.

    The entry's shape changed across ComfyUI versions: ``(w,)`` / ``[w, *patches]`` (old) or
    ``[(w, convert_fn), *patches]`` (current). Accept both.
    """
    first, patches = entry[0], list(entry[1:])
    convert = None
    if isinstance(first, (tuple, list)):
        weight = first[0]
        convert = first[1] if len(first) > 1 else None
    else:
        weight = first
    # unpatched float32 CPU weights are handed out as they are (core copies them into its own
    # modules); anything that gets converted or patched is copied first (ComfyUI patches in place)
    w = weight.detach().to("cpu", torch.float32, copy=bool(patches) or convert is not None)
    if convert is not None:
        try:
            w = convert(w, inplace=True)
        except TypeError:
            w = convert(w)
    if patches:
        w = _calculate_weight(patcher, patches, w, key)
    return w.float()


class EffectiveWeights(Mapping):
    """Read-only ``{key: effective float32 CPU tensor}`` view of a ModelPatcher, computed lazily.

    ``get_key_patches`` hands out the stored tensors (no copy); only weights that are read are
    converted, and patched ones are recomputed with ComfyUI's own ``calculate_weight``.
    """

    def __init__(self, patcher, prefixes: tuple[str, ...]):
        self._patcher = patcher
        kp = patcher.get_key_patches()
        self._entries = {k: v for k, v in kp.items() if k.startswith(prefixes)}

    def __getitem__(self, key):
        if key not in self._entries:
            raise KeyError(key)
        return effective_weight(self._patcher, key, self._entries[key])

    def __iter__(self):
        return iter(self._entries)

    def __len__(self):
        return len(self._entries)

    def _stored(self, key):
        first = self._entries[key][0]
        return first[0] if isinstance(first, (tuple, list)) else first

    def shape(self, key):
        return tuple(self._stored(key).shape)

    def dtype(self, key):
        """The dtype ComfyUI stores the weight in (a written file keeps it)."""
        return self._stored(key).dtype


class HostState:
    """Several :class:`EffectiveWeights` as one lazy state (``keys``/``get``/``shape``/``dtype``), the
    reader core's Flux model takes (:func:`~weightsmith.core.flux_host.model_from_host_state`)."""

    # ComfyUI's scaled-fp8 scales: the effective weights already carry them (the weight's convert
    # function), so core must not see them and scale a second time
    _HIDDEN = (".scale_weight", ".scale_input")

    def __init__(self, sources):
        self._src = {k: s for s in sources for k in s if not k.endswith(self._HIDDEN)}
        self.metadata: dict = {}

    def keys(self):
        return list(self._src)

    def get(self, key):
        return self._src[key][key]

    def shape(self, key):
        return self._src[key].shape(key)

    def dtype(self, key):
        return self._src[key].dtype(key)


class LazyState(Mapping):
    """The union of several :class:`EffectiveWeights`; text-encoder tensors are cached (they are
    read once more when core builds the encoders), UNet tensors are not (read once each)."""

    def __init__(self, sources: list[EffectiveWeights]):
        self._src = {}
        for s in sources:
            for k in s:
                self._src[k] = s
        self._cache = {}
        self._caching = True

    def __getitem__(self, key):
        if key in self._cache:
            return self._cache[key]
        v = self._src[key][key]
        if self._caching and not key.startswith(UNET_PREFIX):
            self._cache[key] = v
        return v

    def done_building(self) -> None:
        """The encoders hold their own copies now: drop the cache (the SDModel keeps this view
        alive for lazy UNet reads, so the cache would double the text encoders' memory)."""
        self._caching = False
        self._cache.clear()

    def __iter__(self):
        return iter(self._src)

    def __len__(self):
        return len(self._src)


# ----------------------------------------------------------------------------------------------
# family and encoders
def detect_family(model, clip) -> str:
    cfg = getattr(getattr(model, "model", None), "model_config", None)
    name = type(cfg).__name__ if cfg is not None else "?"
    fam = FAMILY_BY_CONFIG.get(name)
    inner = getattr(clip, "cond_stage_model", None)
    has = {p: hasattr(inner, p) for p in ("clip_l", "clip_h", "clip_g")}
    clip_fam = (
        "sdxl"
        if (has["clip_g"] and has["clip_l"])
        else "sd2"
        if has["clip_h"]
        else ("sd1" if has["clip_l"] and not has["clip_g"] else None)
    )
    if fam is None:
        # unknown config class (fork or fine-tune type): fall back to the key layout
        uc = getattr(cfg, "unet_config", {}) or {}
        ctx = uc.get("context_dim")
        fam = {768: "sd1", 1024: "sd2", 2048: "sdxl"}.get(ctx)
        if fam is None or not uc.get("model_channels"):
            raise WeightsmithError(
                f"Weightsmith edits {SUPPORTED_FAMILIES} models; this MODEL is {name!r}. Load an "
                "SD1.x/SD2.x/SDXL checkpoint (Load Checkpoint) and connect its MODEL and CLIP."
            )
    if clip_fam != fam:
        raise WeightsmithError(
            f"the MODEL is {fam} but the CLIP is {clip_fam or type(inner).__name__}: connect the MODEL and CLIP "
            "outputs of the same checkpoint loader."
        )
    return fam


def comfy_tokenizer_dirs() -> list:
    """ComfyUI's own CLIP tokenizer folder (``comfy/sd1_tokenizer``), for core's tokenizer lookup."""
    try:
        import comfy

        return [Path(comfy.__file__).parent / "sd1_tokenizer"]
    except Exception:
        return []


def comfy_tokenizers(clip, family: str) -> dict:
    """HF CLIPTokenizers from a ComfyUI CLIP object (copies, with each encoder's pad token)."""
    from ..core.tokenizer import fit_tokenizer

    out = {}
    for comp, attr in TE_PREFIXES[family].items():
        sd_tok = getattr(clip.tokenizer, attr, None)
        tok = getattr(sd_tok, "tokenizer", None)
        if tok is None:
            from ..core.tokenizer import find_clip_tokenizer

            tok = find_clip_tokenizer(host_dirs=comfy_tokenizer_dirs())
        out[comp] = fit_tokenizer(tok, family, comp)
    return out


def clip_skip_from_clip(clip, family: str) -> int | None:
    """ComfyUI's ``CLIPSetLastLayer`` (``clip.layer_idx``) as core's clip-skip (1 = family default)."""
    idx = getattr(clip, "layer_idx", None)
    if idx is None or family == "sdxl":
        return None
    idx = int(idx)
    if idx >= 0:
        raise WeightsmithError("CLIPSetLastLayer with a non-negative layer is not supported; use -1, -2, ...")
    # SD1 default is the last layer (-1); SD2's default is already the penultimate layer (-2)
    return max(1, -idx - (1 if family == "sd2" else 0))


def te_heads(clip, family: str) -> dict:
    heads = {}
    inner = clip.cond_stage_model
    for comp, attr in TE_PREFIXES[family].items():
        enc = getattr(inner, attr)
        n = None
        for obj in (getattr(enc, "transformer", None), enc):
            cfg = getattr(obj, "config", None) or getattr(obj, "config_dict", None)
            if isinstance(cfg, dict) and "num_attention_heads" in cfg:
                n = int(cfg["num_attention_heads"])
                break
        try:
            n = n or int(enc.transformer.text_model.encoder.layers[0].self_attn.heads)
        except AttributeError:
            pass
        if n:
            heads[comp] = n
    return heads


# ----------------------------------------------------------------------------------------------
# Flux.1
FLUX_PREFIX = "diffusion_model."
FLUX_TE = {"clip_l": "clip_l.transformer.", "t5xxl": "t5xxl.transformer."}


def is_flux(model) -> bool:
    """Whether a MODEL is a Flux transformer, from its keys (ComfyUI's config class varies by fork)."""
    from ..core.flux_host import is_flux_state

    try:
        keys = [k for k in model.get_key_patches() if k.startswith(FLUX_PREFIX)]
    except Exception:
        return False
    return is_flux_state(keys)


def flux_from_comfy(model, clip, *, clip_skip: int | None = None):
    """Core's FluxModel over the effective weights of a Flux MODEL and its CLIP (CLIP-L + T5-XXL)."""
    from ..core.flux_host import model_from_host_state

    inner = getattr(clip, "cond_stage_model", None)
    missing = [label for attr, label in (("clip_l", "CLIP-L"), ("t5xxl", "T5-XXL")) if not hasattr(inner, attr)]
    if missing:
        raise WeightsmithError(
            f"the MODEL is Flux but the CLIP has no {' and no '.join(missing)} "
            f"({type(inner).__name__}): connect a DualCLIPLoader with type flux (clip_l + t5xxl files), or the "
            "CLIP output of the Flux checkpoint's loader."
        )
    if clip_skip:
        raise WeightsmithError(
            "clip_skip does not apply to Flux (it reads T5's last layer and CLIP-L's pooled output); set it to 0."
        )
    state = HostState(
        [EffectiveWeights(model, (FLUX_PREFIX,)), EffectiveWeights(clip.patcher, tuple(FLUX_TE.values()))]
    )
    return model_from_host_state(state, where="the Flux MODEL/CLIP", clip_tokenizer_dirs=comfy_tokenizer_dirs())


# ----------------------------------------------------------------------------------------------
# ComfyUI -> SDModel
def sdmodel_from_comfy(
    model, clip, *, clip_skip: int | None = None, need_unet: bool = False, flux_ok: bool = False, what: str = ""
):
    """Build a core SDModel from the effective weights of a ComfyUI MODEL and CLIP (a FluxModel for a
    Flux MODEL where ``flux_ok``; elsewhere a clear refusal naming ``what`` is not available on Flux)."""
    from ..core.model_io import model_from_state_dict

    if is_flux(model):
        if not flux_ok:
            raise WeightsmithError(
                f"{what or 'this node'} does not work on Flux yet; Erase Concepts, IterIS Merge (every method) "
                "and Save Edit as LoRA take a Flux MODEL/CLIP."
            )
        return flux_from_comfy(model, clip, clip_skip=clip_skip)
    family = detect_family(model, clip)
    te_src = {comp: (attr + ".transformer.", False) for comp, attr in TE_PREFIXES[family].items()}
    unet_w = EffectiveWeights(model, (UNET_PREFIX,))
    te_w = EffectiveWeights(clip.patcher, tuple(p for p, _ in te_src.values()))
    if not any(k.endswith("attn2.to_k.weight") for k in unet_w):
        raise WeightsmithError(
            "this MODEL has no cross-attention UNet (diffusion_model.*attn2*); "
            f"Weightsmith edits {SUPPORTED_FAMILIES} models."
        )
    tensors = LazyState([unet_w, te_w])
    if clip_skip is None:
        clip_skip = clip_skip_from_clip(clip, family)
    # core builds the modules without random initialisation (model_io.fast_init)
    sd = model_from_state_dict(
        tensors,
        family,
        te_sources=te_src,
        unet_prefix=UNET_PREFIX,
        tokenizers=comfy_tokenizers(clip, family),
        clip_skip=clip_skip,
        te_heads=te_heads(clip, family),
    )
    tensors.done_building()
    if need_unet:
        sd.unet  # noqa: B018  (build it now, inside the node's progress)
    return sd


# ----------------------------------------------------------------------------------------------
# Edit -> ComfyUI patches
def apply_edit(model, clip, edit, strength: float = 1.0):
    """Clones of ``model`` and ``clip`` with the edit added as patches (inputs untouched)."""
    if edit.family == "flux":
        from ..core.flux_host import host_patches

        shapes = {k: s for w in (model, clip.patcher) for k, s in _shapes(w).items()}
        unet_p, clip_p = host_patches(edit, shapes)
    else:
        unet_p, clip_p = patcher_patches(edit)
    m, c = model, clip
    if unet_p:
        m = model.clone()
        _check_applied(unet_p, m.add_patches(unet_p, float(strength)), "MODEL")
    if clip_p:
        c = clip.clone()
        _check_applied(clip_p, c.add_patches(clip_p, float(strength)), "CLIP")
    return m, c


def _shapes(patcher) -> dict:
    out = {}
    for k, entry in patcher.get_key_patches().items():
        first = entry[0]
        w = first[0] if isinstance(first, (tuple, list)) else first
        out[k] = tuple(w.shape)
    return out


def _check_applied(wanted: dict, got, what: str) -> None:
    check_patches_accepted(wanted, got, "ComfyUI", what, fix="connect the MODEL and CLIP the edit was computed from")


def to_compute_device(sdmodel, need_unet: bool) -> str:
    """Move the solver's copy of the model to ComfyUI's torch device (GPU when there is one),
    after asking ComfyUI to make room; stay on the CPU when that fails. Returns the device used.
    IterIS runs the UNet on sample prompts, which is slow on a CPU."""
    import comfy.model_management as mm

    dev = mm.get_torch_device()
    if getattr(dev, "type", "cpu") == "cpu":
        return "cpu"
    try:
        need = sum(p.numel() * 4 for t in sdmodel.text_encoders.values() for p in t.parameters())
        if need_unet:
            need += sum(p.numel() * 4 for p in sdmodel.unet.parameters())
        mm.free_memory(need * 2, dev)
        for t in sdmodel.text_encoders.values():
            t.to(dev)
        if need_unet:
            sdmodel.unet.to(dev)
        return str(dev)
    except Exception as e:  # out of memory or an unusual device: the CPU always works
        import logging

        logging.warning("Weightsmith: running on the CPU (%s: %s)", type(e).__name__, e)
        for t in sdmodel.text_encoders.values():
            t.to("cpu")
        if need_unet and sdmodel.loaded_unet is not None:
            sdmodel.loaded_unet.to("cpu")
        mm.soft_empty_cache()
        return "cpu"


def weight_norms(sdmodel, edit) -> dict[str, float]:
    """‖ΔW‖/‖W‖ per edited module, W the effective weight the edit was computed from."""
    from ..core.report import relative_changes

    return relative_changes(edit, sdmodel)
