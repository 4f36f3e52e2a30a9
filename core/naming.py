"""Module names across the formats the ecosystem uses.

Weightsmith names every editable module by a *canonical* name: the diffusers component name plus
the module path inside it, with transformers' on-disk ``text_model.`` prefix for text encoders:

    unet.down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k
    text_encoder.text_model.encoder.layers.3.self_attn.k_proj
    text_encoder_2.text_model.encoder.layers.3.self_attn.k_proj        (SDXL's OpenCLIP-bigG)

This module converts canonical names to and from:
- kohya LoRA prefixes (``lora_unet_…`` with diffusers paths for SD1/SD2 and LDM paths for SDXL,
  ``lora_te_…``, ``lora_te1_…``, ``lora_te2_…``),
- the original LDM/CompVis single-file checkpoint keys (``model.diffusion_model.…``,
  ``cond_stage_model.…``, ``conditioner.embedders.N.…``), including OpenCLIP's fused ``in_proj``,
- ComfyUI's internal state-dict keys (``diffusion_model.…``, ``clip_l.transformer.…``).

The UNet map is derived from the UNet's config (block types and ``layers_per_block``), so small
or unusual UNets map as well as the standard ones.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

UNET = "unet"
TE1 = "text_encoder"
TE2 = "text_encoder_2"

# how every front end names a family to the user (the A1111 tab's model line, refusals in all hosts)
FAMILY_LABELS = {"sd1": "SD1.x", "sd2": "SD2.x", "sdxl": "SDXL"}
SUPPORTED_FAMILIES = "SD1.x, SD2.x and SDXL"  # the families Weightsmith edits, as one phrase


def family_label(family: str) -> str:
    """``sd1`` → ``SD1.x`` (an unknown family is shown as it is)."""
    return FAMILY_LABELS.get(family, family)


_RESNET_LDM = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "time_emb_proj": "emb_layers.1",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "conv_shortcut": "skip_connection",
}
_RESNET_DIFF = {v: k for k, v in _RESNET_LDM.items()}


def te_path(name: str) -> str:
    """A text-encoder parameter or module path in canonical form: with ``text_model.`` (transformers
    5 keeps no nested ``text_model`` module in memory; checkpoints and kohya names always have it),
    except CLIPTextModelWithProjection's top-level ``text_projection``. The one place this rule lives."""
    return name if name.startswith(("text_model.", "text_projection")) else "text_model." + name


def _cfg_get(config, key, default=None):
    if isinstance(config, dict):
        return config.get(key, default)
    return getattr(config, key, default)


@dataclass(frozen=True)
class UNetLayout:
    """The block structure of a UNet, enough to map diffusers paths to LDM paths."""

    down_has_attn: tuple[bool, ...]
    up_has_attn: tuple[bool, ...]
    layers_per_block: int
    mid_has_attn: bool = True

    @classmethod
    def from_config(cls, config) -> UNetLayout:
        down = tuple("CrossAttn" in t for t in _cfg_get(config, "down_block_types"))
        up = tuple("CrossAttn" in t for t in _cfg_get(config, "up_block_types"))
        lpb = _cfg_get(config, "layers_per_block", 2)
        if not isinstance(lpb, int):
            lpb = int(lpb[0])
        mid = _cfg_get(config, "mid_block_type", "UNetMidBlock2DCrossAttn")
        return cls(down, up, lpb, mid is not None and "CrossAttn" in str(mid))

    def block_map(self) -> list[tuple[str, str]]:
        """(diffusers prefix, LDM prefix) pairs for every block-level module."""
        pairs: list[tuple[str, str]] = [
            ("conv_in", "input_blocks.0.0"),
            ("time_embedding.linear_1", "time_embed.0"),
            ("time_embedding.linear_2", "time_embed.2"),
            ("add_embedding.linear_1", "label_emb.0.0"),
            ("add_embedding.linear_2", "label_emb.0.2"),
            ("conv_norm_out", "out.0"),
            ("conv_out", "out.2"),
        ]
        lpb = self.layers_per_block
        n_down = len(self.down_has_attn)
        for i, has_attn in enumerate(self.down_has_attn):
            for j in range(lpb):
                n = 1 + i * (lpb + 1) + j
                pairs.append((f"down_blocks.{i}.resnets.{j}", f"input_blocks.{n}.0"))
                if has_attn:
                    pairs.append((f"down_blocks.{i}.attentions.{j}", f"input_blocks.{n}.1"))
            if i < n_down - 1:
                n = 1 + i * (lpb + 1) + lpb
                pairs.append((f"down_blocks.{i}.downsamplers.0.conv", f"input_blocks.{n}.0.op"))
        pairs.append(("mid_block.resnets.0", "middle_block.0"))
        if self.mid_has_attn:
            pairs.append(("mid_block.attentions.0", "middle_block.1"))
            pairs.append(("mid_block.resnets.1", "middle_block.2"))
        else:
            pairs.append(("mid_block.resnets.1", "middle_block.1"))
        n_up = len(self.up_has_attn)
        for i, has_attn in enumerate(self.up_has_attn):
            for j in range(lpb + 1):
                n = i * (lpb + 1) + j
                pairs.append((f"up_blocks.{i}.resnets.{j}", f"output_blocks.{n}.0"))
                if has_attn:
                    pairs.append((f"up_blocks.{i}.attentions.{j}", f"output_blocks.{n}.1"))
            if i < n_up - 1:
                n = i * (lpb + 1) + lpb
                pairs.append((f"up_blocks.{i}.upsamplers.0.conv", f"output_blocks.{n}.{2 if has_attn else 1}.conv"))
        return pairs

    def to_ldm(self, path: str) -> str:
        """diffusers UNet module path -> LDM path (``model.diffusion_model.`` not included)."""
        for diff, ldm in sorted(self.block_map(), key=lambda p: -len(p[0])):
            if path == diff or path.startswith(diff + "."):
                rest = path[len(diff) :].lstrip(".")
                if ".resnets." in diff and rest:
                    head, _, tail = rest.partition(".")
                    rest = _RESNET_LDM.get(head, head) + ("." + tail if tail else "")
                return ldm + ("." + rest if rest else "")
        raise KeyError(f"no LDM name for UNet module {path!r}")

    def to_diffusers(self, path: str) -> str:
        """LDM UNet module path -> diffusers path."""
        for diff, ldm in sorted(self.block_map(), key=lambda p: -len(p[1])):
            if path == ldm or path.startswith(ldm + "."):
                rest = path[len(ldm) :].lstrip(".")
                if ".resnets." in diff and rest:
                    for ldm_sub, diff_sub in _RESNET_DIFF.items():
                        if rest == ldm_sub or rest.startswith(ldm_sub + "."):
                            rest = diff_sub + rest[len(ldm_sub) :]
                            break
                return diff + ("." + rest if rest else "")
        raise KeyError(f"no diffusers name for LDM UNet module {path!r}")


# ----------------------------------------------------------------------------------------------
# canonical <-> kohya
def kohya_prefix(canonical: str, family: str, layout: UNetLayout | None = None) -> str:
    """Canonical module name -> kohya LoRA key prefix (without ``.lora_down.weight``)."""
    comp, _, path = canonical.partition(".")
    if comp == UNET:
        if family == "sdxl":
            if layout is None:
                raise ValueError("SDXL kohya names need the UNet layout")
            path = layout.to_ldm(path)
        return "lora_unet_" + path.replace(".", "_")
    if comp == TE1:
        return ("lora_te1_" if family == "sdxl" else "lora_te_") + path.replace(".", "_")
    if comp == TE2:
        return "lora_te2_" + path.replace(".", "_")
    raise ValueError(f"not a canonical module name: {canonical!r}")


def kohya_index(canonical_names, family: str, layout: UNetLayout | None = None) -> dict[str, str]:
    """kohya prefix -> canonical name, for every module of a model (kohya names are lossy:
    ``_`` stands for ``.`` and ``_``, so the map is built forwards from the real module names)."""
    return {kohya_prefix(c, family, layout): c for c in canonical_names}


# ----------------------------------------------------------------------------------------------
# canonical <-> LDM single-file checkpoint keys and ComfyUI keys
LDM_UNET_PREFIX = "model.diffusion_model."
COMFY_UNET_PREFIX = "diffusion_model."


def sdxl_embedder_prefix(index: int, open_clip: bool) -> str:
    """State-dict prefix of SDXL's text embedder ``conditioner.embedders[index]`` (CLIP-L: HF
    ``transformer``; bigG: OpenCLIP ``model``)."""
    return f"conditioner.embedders.{index}.{'model' if open_clip else 'transformer'}."


def te_checkpoint_prefix(family: str, component: str) -> tuple[str, bool]:
    """(state-dict prefix, is_open_clip) of a text encoder in an LDM single-file checkpoint."""
    if family == "sdxl":
        return (sdxl_embedder_prefix(0, False), False) if component == TE1 else (sdxl_embedder_prefix(1, True), True)
    if family == "sd2":
        return "cond_stage_model.model.", True
    return "cond_stage_model.transformer.", False


# ComfyUI: the CLIP object's attribute (and state-dict prefix) of each family's text encoders
COMFY_TE_ATTRS = {"sd1": {TE1: "clip_l"}, "sd2": {TE1: "clip_h"}, "sdxl": {TE1: "clip_l", TE2: "clip_g"}}


def comfy_te_prefix(family: str, component: str) -> str:
    attrs = COMFY_TE_ATTRS.get(family, COMFY_TE_ATTRS["sd1"])
    return attrs.get(component, attrs[TE1]) + ".transformer."


_OC_LAYER = re.compile(r"^text_model\.encoder\.layers\.(\d+)\.(.+)$")
_OC_SUB = {
    "self_attn.out_proj": "attn.out_proj",
    "layer_norm1": "ln_1",
    "layer_norm2": "ln_2",
    "mlp.fc1": "mlp.c_fc",
    "mlp.fc2": "mlp.c_proj",
}
_QKV = {"self_attn.q_proj": 0, "self_attn.k_proj": 1, "self_attn.v_proj": 2}


@dataclass(frozen=True)
class CheckpointSlot:
    """Where a canonical weight lives in a checkpoint: key, optional row slice of a fused tensor,
    and whether the stored tensor is the transpose (OpenCLIP ``text_projection``)."""

    key: str
    rows: tuple[int, int] | None = None
    transposed: bool = False


def open_clip_slot(te_param: str, hidden: int) -> CheckpointSlot:
    """transformers CLIP parameter path (``text_model.…`` form) -> OpenCLIP key."""
    if te_param == "text_model.embeddings.token_embedding.weight":
        return CheckpointSlot("token_embedding.weight")
    if te_param == "text_model.embeddings.position_embedding.weight":
        return CheckpointSlot("positional_embedding")
    if te_param.startswith("text_model.final_layer_norm."):
        return CheckpointSlot("ln_final." + te_param.rsplit(".", 1)[1])
    if te_param == "text_projection.weight":
        return CheckpointSlot("text_projection", transposed=True)
    m = _OC_LAYER.match(te_param)
    if not m:
        raise KeyError(f"no OpenCLIP key for {te_param!r}")
    idx, rest = m.groups()
    mod, _, leaf = rest.rpartition(".")
    base = f"transformer.resblocks.{idx}."
    if mod in _QKV:
        q = _QKV[mod]
        return CheckpointSlot(base + "attn.in_proj_" + leaf, rows=(q * hidden, (q + 1) * hidden))
    if mod in _OC_SUB:
        return CheckpointSlot(base + _OC_SUB[mod] + "." + leaf)
    raise KeyError(f"no OpenCLIP key for {te_param!r}")


def checkpoint_slot(
    canonical_param: str, family: str, layout: UNetLayout | None, te_hidden: dict[str, int] | None = None
) -> CheckpointSlot:
    """Canonical *parameter* name (module name + ``.weight``/``.bias``) -> LDM checkpoint slot."""
    comp, _, path = canonical_param.partition(".")
    if comp == UNET:
        mod, _, leaf = path.rpartition(".")
        return CheckpointSlot(LDM_UNET_PREFIX + layout.to_ldm(mod) + "." + leaf)
    prefix, is_oc = te_checkpoint_prefix(family, comp)
    if is_oc:
        slot = open_clip_slot(path, (te_hidden or {})[comp])
        return CheckpointSlot(prefix + slot.key, slot.rows, slot.transposed)
    return CheckpointSlot(prefix + path)


def comfy_key(canonical_param: str, family: str, layout: UNetLayout) -> str:
    """Canonical parameter name -> ComfyUI model/clip state-dict key (for ``add_patches``)."""
    comp, _, path = canonical_param.partition(".")
    if comp == UNET:
        mod, _, leaf = path.rpartition(".")
        return COMFY_UNET_PREFIX + layout.to_ldm(mod) + "." + leaf
    return comfy_te_prefix(family, comp) + path
