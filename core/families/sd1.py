"""Stable Diffusion 1.x (docs/method.md, "Model families"): one CLIP-L text encoder read at its last
layer (or the ``clip_skip`` layer) through the final LayerNorm, context 768; LDM single files keep it
under ``cond_stage_model.transformer.``; kohya LoRAs name the UNet by diffusers paths."""

from __future__ import annotations

from .base import TE1, TE2
from .sd_common import (
    checkpoint_layout,
    clip_component,
    has_prefix,
    lora_layout,
    recognise_single_encoder,
    sd_family,
    single_encoder_specs,
)


def sdxl_text_keys(prefixes) -> str | None:
    """SDXL's text-encoder keys in a LoRA for a one-encoder family (refused)."""
    if any(p.startswith(("lora_te1_", "lora_te2_")) for p in prefixes):
        return "has SDXL text-encoder keys (lora_te1_/lora_te2_)"
    return None


FAMILY = sd_family(
    "sd1",
    "SD1.x",
    2,
    encoders=(clip_component(TE1, "clip", "tokenizer"),),
    recognise_keys=has_prefix("cond_stage_model.transformer."),
    recognise_components=recognise_single_encoder(gelu=False),
    encoder_specs=single_encoder_specs(-1, -1),
    checkpoint=checkpoint_layout({TE1: ("cond_stage_model.transformer.", False)}, {TE1: "clip_l"}),
    lora=lora_layout(
        {TE1: "lora_te_", TE2: "lora_te2_"},
        {TE1: "clip_l"},
        unet_ldm_names=False,
        diffusers_te_aliases=False,
        base_model_version="sd_v1",
        metadata_hint=lambda v: "v1" in v,
        foreign=sdxl_text_keys,
    ),
    denoiser_defaults={"sample_size": 64, "attention_head_dim": 8},
)
