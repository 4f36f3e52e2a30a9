"""Stable Diffusion 2.x (docs/method.md, "Model families"): one OpenCLIP-H text encoder read at its
penultimate layer through the final LayerNorm, context 1024 (a single file keeps all 24 layers, a
diffusers folder 23, so the read layer is -2 there and -1 here); LDM single files keep it under
``cond_stage_model.model.`` in OpenCLIP names with a fused ``in_proj``."""

from __future__ import annotations

from .base import TE1, TE2
from .sd1 import sdxl_text_keys
from .sd_common import (
    checkpoint_layout,
    clip_component,
    has_prefix,
    lora_layout,
    recognise_single_encoder,
    sd_family,
    single_encoder_specs,
)

FAMILY = sd_family(
    "sd2",
    "SD2.x",
    1,
    encoders=(clip_component(TE1, "open_clip", "tokenizer"),),
    recognise_keys=has_prefix("cond_stage_model.model.transformer."),
    recognise_components=recognise_single_encoder(gelu=True),
    encoder_specs=single_encoder_specs(-2, -1),
    checkpoint=checkpoint_layout({TE1: ("cond_stage_model.model.", True)}, {TE1: "clip_h"}),
    lora=lora_layout(
        {TE1: "lora_te_", TE2: "lora_te2_"},
        {TE1: "clip_h"},
        unet_ldm_names=False,
        diffusers_te_aliases=False,
        base_model_version="sd_v2",
        metadata_hint=lambda v: "v2" in v or "sd_v2" in v or "2-1" in v,
        foreign=sdxl_text_keys,
    ),
    denoiser_defaults={"sample_size": 64},
)
