"""SDXL (docs/method.md, "Model families"): CLIP-L and OpenCLIP-bigG read at their penultimate
layers without the final LayerNorm, concatenated to 2048; the pooled, projected bigG EOS output is
the second conditioning input (with the size/crop ids), so every bigG layer feeds the UNet. LDM
single files keep the encoders under ``conditioner.embedders.0.transformer.`` and
``conditioner.embedders.1.model.``; kohya LoRAs name the UNet by LDM paths and the encoders
``lora_te1_``/``lora_te2_``."""

from __future__ import annotations

from ..errors import WeightsmithError
from .base import TE1, TE2, EncoderSpec
from .sd_common import (
    check_clip_skip,
    checkpoint_layout,
    clip_component,
    has_prefix,
    lora_layout,
    sd_family,
    sdxl_embedder_prefix,
)


def encoder_specs(num_layers: dict, from_diffusers: bool, clip_skip: int | None = None) -> dict:
    """Both encoders at the penultimate layer, no final LayerNorm; bigG's pooled output too."""
    check_clip_skip(clip_skip)
    if clip_skip not in (None, 1, 2):
        raise WeightsmithError("clip-skip is fixed to the penultimate layer for SDXL; omit it.")
    return {TE1: EncoderSpec(-2, False), TE2: EncoderSpec(-2, False, pooled=True)}


def key_hint(prefixes) -> bool:
    """Keys only SDXL LoRAs have: two text encoders, or a tenth transformer block in an LDM block."""
    if any(p.startswith(("lora_te1_", "lora_te2_", "clip_g.", "text_encoders.clip_g.")) for p in prefixes):
        return True
    return any(
        p.startswith(("lora_unet_input_blocks", "lora_unet_output_blocks", "lora_unet_middle_block"))
        and "transformer_blocks_9" in p
        for p in prefixes
    )


COMFY = {TE1: "clip_l", TE2: "clip_g"}

FAMILY = sd_family(
    "sdxl",
    "SDXL",
    0,
    encoders=(clip_component(TE1, "clip", "tokenizer"), clip_component(TE2, "open_clip", "tokenizer_2")),
    recognise_keys=has_prefix("conditioner.embedders.1.model."),
    recognise_components=lambda te_configs, denoiser_config=None: len(te_configs) == 2,
    encoder_specs=encoder_specs,
    checkpoint=checkpoint_layout(
        {TE1: (sdxl_embedder_prefix(0, False), False), TE2: (sdxl_embedder_prefix(1, True), True)}, COMFY
    ),
    lora=lora_layout(
        {TE1: "lora_te1_", TE2: "lora_te2_"},
        COMFY,
        unet_ldm_names=True,
        diffusers_te_aliases=True,
        base_model_version="sdxl_base_v1-0",
        metadata_hint=lambda v: "xl" in v,
        key_hint=key_hint,
    ),
    size_conditioning=True,
    denoiser_defaults={"sample_size": 128},
    half_beside_host=True,
)
