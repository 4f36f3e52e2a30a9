"""Weightsmith · LoRA Stack and IterIS Merge: merge several LoRAs into one closed-form edit.

A stack is an immutable tuple of entries ``{"name", "path", "weight", "prompts"}``; chaining
Stack nodes appends. The merge reads the LoRA files with core's reader, computes the merged ΔW
on the effective weights of the MODEL/CLIP (connect the *base* model, without these LoRAs) and
returns it as patches on clones.
"""

from __future__ import annotations

import logging
import os
import time

from ..core.blockweights import BLOCKS_HELP, NO_PRESET, PRESET_CHOICES, host_spec
from ..core.merge.options import METHODS, MergeOptions, host_default, machine_is_cpu, with_quick
from ..core.prompt_lists import comfy_list
from .common import (
    CATEGORY,
    EDIT_RETURN_NAMES,
    EDIT_RETURN_TYPES,
    STACK_TYPE,
    edit_result,
    host_progress,
    options_of,
    user_errors,
    widget,
)

MERGE_METHODS = list(METHODS)


def _lora_list():
    import folder_paths

    return folder_paths.get_filename_list("loras")


class WeightsmithLoraStack:
    DESCRIPTION = (
        "Add a LoRA (with its weight and sample prompts) to a stack for IterIS Merge. Chain several "
        "Stack nodes to merge more LoRAs."
    )
    CATEGORY = CATEGORY
    FUNCTION = "run"
    RETURN_TYPES = (STACK_TYPE,)
    RETURN_NAMES = ("stack",)
    OUTPUT_TOOLTIPS = ("The stack: the LoRAs so far plus this one.",)

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "lora_name": (_lora_list(), {"tooltip": "A LoRA file from the loras folder."}),
                "weight": (
                    "FLOAT",
                    {
                        "default": 1.0,
                        "min": -4.0,
                        "max": 4.0,
                        "step": 0.05,
                        "tooltip": "The LoRA's strength in the merge.",
                    },
                ),
                "sample_prompts": (
                    "STRING",
                    {
                        "multiline": True,
                        "default": "",
                        "tooltip": "Prompts this LoRA is used with, one per line (; also separates; IterIS and "
                        "RegMean fit the merge on them; empty = read the LoRA's "
                        "training tags if it has them).",
                    },
                ),
            },
            "optional": {
                "stack": (STACK_TYPE, {"tooltip": "An earlier stack to extend (chain Stack nodes)."}),
                "block_preset": (
                    list(PRESET_CHOICES),
                    {
                        "default": NO_PRESET,
                        "tooltip": "A LoRA Block Weight preset for this LoRA ("
                        "none = every block 1); block_weights, when "
                        "not empty, takes its place.",
                    },
                ),
                "block_weights": ("STRING", {"default": "", "tooltip": BLOCKS_HELP}),
            },
        }

    @classmethod
    def IS_CHANGED(cls, lora_name, weight, sample_prompts, stack=None, block_preset=None, block_weights=None):
        # re-run when the file on disk changes, not only when the inputs do
        import folder_paths

        path = folder_paths.get_full_path("loras", lora_name)
        try:
            st = os.stat(path)
            return f"{lora_name}|{st.st_mtime_ns}|{st.st_size}|{weight}|{sample_prompts}|{block_preset}|{block_weights}"
        except (OSError, TypeError):
            return f"{lora_name}|missing|{weight}|{sample_prompts}|{block_preset}|{block_weights}"

    def run(self, lora_name, weight, sample_prompts, stack=None, block_preset=None, block_weights=None):
        import folder_paths

        path = folder_paths.get_full_path_or_raise("loras", lora_name)
        entry = {
            "name": lora_name,
            "path": path,
            "weight": float(weight),
            "prompts": tuple(comfy_list(sample_prompts)),
            "blocks": host_spec(block_preset, block_weights),
        }
        return (tuple(stack or ()) + (entry,),)


class WeightsmithIterISMerge:
    DESCRIPTION = (
        "Merge a stack of LoRAs into the model in closed form: IterIS (iterative inference-solving "
        "alignment, default) or a baseline (linear, concat, svd, ties, dare, regmean). Connect the base "
        "MODEL/CLIP without these LoRAs. Returns patched clones, the edit and a report."
    )
    CATEGORY = CATEGORY
    FUNCTION = "run"
    RETURN_TYPES = EDIT_RETURN_TYPES
    RETURN_NAMES = EDIT_RETURN_NAMES
    OUTPUT_TOOLTIPS = (
        "The model with the merged LoRAs applied.",
        "The CLIP with the merged LoRAs applied.",
        "The merged edit: connect it to Save Edit as LoRA.",
        "Per-layer report.",
        "The report as a picture.",
    )

    @classmethod
    def INPUT_TYPES(cls):
        cpu = machine_is_cpu()
        return {
            "required": {
                "model": (
                    "MODEL",
                    {"tooltip": "The base model the LoRAs were trained for (SD1.x, SD2.x, SDXL, Flux.1)."},
                ),
                "clip": ("CLIP", {"tooltip": "The CLIP of the same checkpoint."}),
                "stack": (STACK_TYPE, {"tooltip": "The LoRAs to merge (LoRA Stack nodes)."}),
                "method": (
                    MERGE_METHODS,
                    {
                        "default": "iteris",
                        "tooltip": "iteris: IterIS (best, needs sample prompts). Baselines: "
                        "linear (weighted sum), concat, svd, ties, dare, regmean.",
                    },
                ),
                # on a machine without a GPU these four start from core's quick settings (docs/merge.md, "Speed")
                "iterations": widget(MergeOptions, "iterations", "INT", default=host_default("iterations", cpu)),
                "samples": widget(MergeOptions, "samples", "INT", default=host_default("samples", cpu)),
                "steps": widget(MergeOptions, "steps", "INT", default=host_default("steps", cpu)),
                # ComfyUI's INT widget needs a number: 512 here (core's default is the model's native size)
                "resolution": widget(
                    MergeOptions, "resolution", "INT", default=host_default("resolution", cpu, default=512)
                ),
                "seed": widget(MergeOptions, "seed", "INT"),
            },
            "optional": {
                "untouched": widget(MergeOptions, "untouched", "choice"),
                "ridge_toward": widget(MergeOptions, "ridge_toward", "choice"),
                "max_memory_gb": widget(MergeOptions, "max_memory_gb", "FLOAT"),
            },
        }

    def run(
        self,
        model,
        clip,
        stack,
        method,
        iterations,
        samples,
        steps,
        resolution,
        seed,
        untouched=None,
        max_memory_gb=None,
        ridge_toward=None,
    ):
        from ..core.errors import WeightsmithError
        from ..core.merge import merge
        from . import comfy_adapter as ca

        with user_errors():
            if not stack:
                raise WeightsmithError("the LoRA stack is empty; add LoRA Stack nodes.")
            t0 = time.perf_counter()
            progress, cancel = host_progress()
            cancel()
            # Flux: every method (IterIS and RegMean sample the transformer, core/flux_sampling.py)
            sd = ca.sdmodel_from_comfy(model, clip, what="IterIS Merge", flux_ok=True)
            if sd.family != "flux":
                ca.to_compute_device(sd, need_unet=method in ("iteris", "regmean"))
            loras = [e["path"] for e in stack]  # core reads and binds them to this model
            weights = [e["weight"] for e in stack]
            prompts = [list(e["prompts"]) for e in stack]
            prompts = prompts if any(prompts) else None
            values = dict(
                iterations=int(iterations),
                samples=int(samples),
                steps=int(steps),
                resolution=int(resolution),
                seed=int(seed),
                untouched=untouched,
                ridge_toward=ridge_toward,
                max_memory_gb=None if max_memory_gb is None else float(max_memory_gb),
            )
            opts = options_of(MergeOptions, **with_quick(values, machine_is_cpu()))
            logging.info("Weightsmith: merging %d LoRAs (%s)", len(loras), method)
            blocks = [e.get("blocks") for e in stack]
            edit = merge(
                sd,
                loras,
                method=method,
                weights=weights,
                prompts=prompts,
                options=opts,
                progress=progress,
                cancel=cancel,
                blocks=blocks if any(blocks) else None,
            )
            edit.report["stack"] = [
                f"{e['name']} x{e['weight']:g}" + (f" [{e['blocks']}]" if e.get("blocks") else "") for e in stack
            ]
            return edit_result(model, clip, sd, edit, f"Weightsmith merge ({method}): {len(stack)} LoRAs", t0)
