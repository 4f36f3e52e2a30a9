"""Which model family a checkpoint's key layout is, and each family's configs inferred from its keys.

One module per key layout: :mod:`.ldm` holds the LDM/CompVis layout of SD1.x, SD2.x and SDXL
single-file checkpoints (the UNet's and the CLIP text encoders' configs from tensor shapes, no hub
look-ups). Which family a key set is, each family's module declares (``Family.recognise_keys``,
docs/method.md, "Model families"); :func:`detect_checkpoint_family` asks them in turn.
"""

from __future__ import annotations

from .. import families


def detect_checkpoint_family(keys) -> str:
    """``"sd1"``, ``"sd2"`` or ``"sdxl"`` (any registered family) from a single-file checkpoint's
    keys; a sentence naming what the file is instead (a UNet-only file, a LoRA, no SD model) otherwise."""
    return families.detect_from_keys(keys)
