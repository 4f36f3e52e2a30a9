"""Weightsmith · Erase Concepts: closed-form concept erasure on a MODEL/CLIP pair.

The edit is computed from the effective weights of the inputs (LoRAs applied upstream count) and
returned as patches on clones: the inputs and every other branch of the graph are unchanged.
"""

from __future__ import annotations

import logging
import time

from ..core.erase.options import METHOD_HELP, EraseOptions
from ..core.erase.options import METHODS as _METHODS
from ..core.optspec import spec
from .common import (
    CATEGORY,
    EDIT_RETURN_NAMES,
    EDIT_RETURN_TYPES,
    edit_result,
    host_progress,
    options_of,
    user_errors,
    widget,
)

METHODS = list(_METHODS)


def parse_layer_range(text: str):
    """'' / 'auto' -> None; '3-8' or '3..8' -> (3, 8); '5' -> (5, 5) (core.optspec.parse_layer_range)."""
    from ..core.optspec import parse_layer_range as parse

    return parse(text, "layers")


class WeightsmithEraseConcepts:
    DESCRIPTION = (
        "Erase concepts from a model in closed form (ErasePro, its zero-residual ablation, or UCE). "
        "Each target is mapped onto its anchor; preserved concepts are kept. Returns the edited "
        "MODEL and CLIP (patched clones; the inputs are unchanged), the edit (save it with "
        "Save Edit as LoRA) and a report."
    )
    CATEGORY = CATEGORY
    FUNCTION = "run"
    RETURN_TYPES = EDIT_RETURN_TYPES
    RETURN_NAMES = EDIT_RETURN_NAMES
    OUTPUT_TOOLTIPS = (
        "The model with the erasure applied (UNet cross-attention patches).",
        "The CLIP with the erasure applied (text-encoder patches; ErasePro only).",
        "The edit itself: connect it to Save Edit as LoRA.",
        "Per-layer report: |dW|/|W| and residuals before -> after.",
        "The report as a picture.",
    )

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": (
                    "MODEL",
                    {
                        "tooltip": "The model to edit (SD1.x, SD2.x, SDXL or Flux.1). "
                        "LoRAs applied upstream are part of it."
                    },
                ),
                "clip": (
                    "CLIP",
                    {
                        "tooltip": "The CLIP of the same checkpoint (Flux: DualCLIPLoader type flux); "
                        "prompts are encoded with it."
                    },
                ),
                "targets": (
                    "STRING",
                    {
                        "multiline": True,
                        "default": "Van Gogh",
                        "tooltip": "Concepts to erase, one per line (; also separates).",
                    },
                ),
                "anchors": (
                    "STRING",
                    {
                        "multiline": True,
                        "default": "art",
                        "tooltip": "What each target becomes, one per line (one line for all targets; "
                        "empty = the unconditional prompt).",
                    },
                ),
                "method": (METHODS, {"default": METHODS[0], "tooltip": METHOD_HELP}),
                "strength": (
                    "FLOAT",
                    {
                        "default": 1.0,
                        "min": -2.0,
                        "max": 2.0,
                        "step": 0.05,
                        "tooltip": "Scale of the edit: 1 = the solved edit, 0 = none.",
                    },
                ),
            },
            "optional": {
                "preserve": (
                    "STRING",
                    {
                        "multiline": True,
                        "default": "",
                        "tooltip": "Concepts to keep unchanged, one per line (; also separates).",
                    },
                ),
                "layers": (
                    "STRING",
                    {"default": "", "advanced": True, "tooltip": spec(EraseOptions, "te_layers").help},
                ),
                "token_mode": widget(EraseOptions, "tokens", "choice", advanced=True),
                "lam": widget(EraseOptions, "lam", "FLOAT", advanced=True),
                "prompt_expansion": (
                    ["auto", "on", "off"],
                    {
                        "default": "auto",
                        "advanced": True,
                        "tooltip": "Expand each concept into template prompts (auto: "
                        "on for erasepro/zero-residual, off for uce).",
                    },
                ),
                "clip_skip": (
                    "INT",
                    {
                        "default": 0,
                        "min": 0,
                        "max": 12,
                        "advanced": True,
                        "tooltip": "0 = take it from the CLIP input (Set Last Layer); 1 = last layer, "
                        "2 = penultimate (SD1/SD2; SDXL is fixed).",
                    },
                ),
                # added after the others: a saved workflow's widget values are positional, so a new widget
                # goes last and workflows saved before it keep loading
                "harden_rounds": widget(EraseOptions, "harden_rounds", "INT", advanced=True),
            },
        }

    def run(
        self,
        model,
        clip,
        targets,
        anchors,
        method,
        strength,
        preserve="",
        layers="",
        token_mode=None,
        lam=None,
        harden_rounds=None,
        prompt_expansion="auto",
        clip_skip=0,
    ):
        from ..core.erase import erase
        from ..core.errors import WeightsmithError
        from ..core.prompt_lists import comfy_list as lines
        from . import comfy_adapter as ca

        with user_errors():
            if not lines(targets):
                raise WeightsmithError("targets is empty: write at least one concept to erase, one per line.")
            t0 = time.perf_counter()
            progress, cancel = host_progress()
            cancel()
            sd = ca.sdmodel_from_comfy(model, clip, clip_skip=clip_skip or None, flux_ok=True)
            opts = options_of(
                EraseOptions,
                tokens=token_mode,
                lam=None if lam is None else float(lam),
                harden_rounds=harden_rounds,
                te_layers=parse_layer_range(layers),
                expand_prompts={"auto": None, "on": True, "off": False}[prompt_expansion],
            )
            anchor_list = lines(anchors) or [""]
            logging.info("Weightsmith: erasing %s (%s)", lines(targets), method)
            edit = erase(
                sd,
                lines(targets),
                anchor_list,
                lines(preserve),
                method=method,
                options=opts,
                progress=progress,
                cancel=cancel,
            )
            edit = edit.scaled(strength) if float(strength) != 1.0 else edit
            edit.report["strength"] = float(strength)
            title = f"Weightsmith erase ({method}): {', '.join(lines(targets))[:60]}"
            return edit_result(model, clip, sd, edit, title, t0)
