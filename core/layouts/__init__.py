"""Which model family a checkpoint's key layout is, and each family's configs inferred from its keys.

One module per key layout: :mod:`.ldm` holds the LDM/CompVis layout of SD1.x, SD2.x and SDXL
single-file checkpoints (the UNet's and the CLIP text encoders' configs from tensor shapes, no hub
look-ups). :func:`detect_checkpoint_family` is the one place that tells the layouts apart; a new
family adds its module here and its test to this function.
"""

from __future__ import annotations

from ..errors import WeightsmithError
from ..naming import LDM_UNET_PREFIX


def detect_checkpoint_family(keys) -> str:
    """``"sd1"``, ``"sd2"`` or ``"sdxl"`` from a single-file checkpoint's keys; a sentence naming what
    the file is instead (a UNet-only file, a LoRA, no SD model) otherwise."""
    ks = set(keys)
    if any(k.startswith("conditioner.embedders.1.model.") for k in ks):
        return "sdxl"
    if any(k.startswith("cond_stage_model.model.transformer.") for k in ks):
        return "sd2"
    if any(k.startswith("cond_stage_model.transformer.") for k in ks):
        return "sd1"
    if any(k.startswith(LDM_UNET_PREFIX) for k in ks):
        raise WeightsmithError(
            "unknown model family: the checkpoint has a UNet but no text encoder Weightsmith recognises "
            "(expected cond_stage_model.* for SD1.x/SD2.x or conditioner.embedders.* for SDXL). "
            "Use a full checkpoint, not a UNet-only file."
        )
    if any(k.startswith(("lora_", "lora_unet", "lora_te")) or ".lora_down." in k for k in ks):
        raise WeightsmithError("this file is a LoRA, not a model checkpoint. Pass the base model to --model.")
    raise WeightsmithError(
        "this file is not a Stable Diffusion model (no model.diffusion_model.* UNet keys). Pass an SD1.x, "
        "SD2.x or SDXL .safetensors checkpoint or a diffusers folder."
    )
