"""Module names across the formats the ecosystem uses, for any family.

Weightsmith names every editable module by a *canonical* name: the diffusers component name plus
the module path inside it, with transformers' on-disk ``text_model.`` prefix for text encoders:

    unet.down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k
    text_encoder.text_model.encoder.layers.3.self_attn.k_proj
    text_encoder_2.text_model.encoder.layers.3.self_attn.k_proj        (SDXL's OpenCLIP-bigG)

Each family declares how its canonical names map to kohya LoRA prefixes, single-file checkpoint keys
(with row ranges of fused tensors) and ComfyUI's keys (:mod:`.families`, docs/method.md, "Model
families"); the functions here take a family name and ask its module, so callers that hold only a
name (edits, hosts) need not import the families. The SD key maps themselves (``UNetLayout``, the
OpenCLIP slots) live in :mod:`.families.sd_common` and are re-exported here.
"""

from __future__ import annotations

from . import families
from .families.base import TE1, TE2, UNET, CheckpointSlot
from .families.sd_common import (
    COMFY_UNET_PREFIX,
    LDM_UNET_PREFIX,
    UNetLayout,
    open_clip_slot,
    sdxl_embedder_prefix,
    te_path,
)

# how every front end names a family to the user (the A1111 tab's model line, refusals in all hosts)
FAMILY_LABELS = families.labels()
SUPPORTED_FAMILIES = families.supported_phrase()  # the families Weightsmith edits, as one phrase


def family_label(family: str) -> str:
    """``sd1`` → ``SD1.x`` (an unknown family is shown as it is)."""
    return families.label(family)


# ----------------------------------------------------------------------------------------------
# canonical <-> kohya
def kohya_prefix(canonical: str, family: str, layout=None) -> str:
    """Canonical module name -> kohya LoRA key prefix (without ``.lora_down.weight``)."""
    return families.get(family).lora.write_prefix(canonical, layout)


def kohya_index(canonical_names, family: str, layout=None) -> dict[str, str]:
    """kohya prefix -> canonical name, for every module of a model (kohya names are lossy:
    ``_`` stands for ``.`` and ``_``, so the map is built forwards from the real module names)."""
    write = families.get(family).lora.write_prefix
    return {write(c, layout): c for c in canonical_names}


# ----------------------------------------------------------------------------------------------
# canonical <-> single-file checkpoint keys and ComfyUI keys
def te_checkpoint_prefix(family: str, component: str) -> tuple[str, bool]:
    """(state-dict prefix, is_open_clip) of a text encoder in a single-file checkpoint."""
    return families.get(family).checkpoint.te_prefix(component)


# ComfyUI: the CLIP object's attribute (and state-dict prefix) of each family's text encoders
COMFY_TE_ATTRS = {f.name: dict(f.checkpoint.comfy_te_attrs) for f in families.all_families()}


def comfy_te_prefix(family: str, component: str) -> str:
    attrs = COMFY_TE_ATTRS.get(family, COMFY_TE_ATTRS["sd1"])
    return attrs.get(component, attrs[TE1]) + ".transformer."


def checkpoint_slot(
    canonical_param: str, family: str, layout, te_hidden: dict[str, int] | None = None
) -> CheckpointSlot:
    """Canonical *parameter* name (module name + ``.weight``/``.bias``) -> single-file checkpoint slot."""
    return families.get(family).checkpoint.slot(canonical_param, layout, te_hidden)


def comfy_key(canonical_param: str, family: str, layout) -> str:
    """Canonical parameter name -> ComfyUI model/clip state-dict key (for ``add_patches``)."""
    return families.get(family).checkpoint.comfy_key(canonical_param, layout)


__all__ = [
    "COMFY_TE_ATTRS",
    "COMFY_UNET_PREFIX",
    "FAMILY_LABELS",
    "LDM_UNET_PREFIX",
    "SUPPORTED_FAMILIES",
    "TE1",
    "TE2",
    "UNET",
    "CheckpointSlot",
    "UNetLayout",
    "checkpoint_slot",
    "comfy_key",
    "comfy_te_prefix",
    "family_label",
    "kohya_index",
    "kohya_prefix",
    "open_clip_slot",
    "sdxl_embedder_prefix",
    "te_checkpoint_prefix",
    "te_path",
]
