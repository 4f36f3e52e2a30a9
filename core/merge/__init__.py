"""LoRA merging: IterIS (docs/method.md, "LoRA merging") and the baselines users compare it with.

    from weightsmith.core.model_io import load_model
    from weightsmith.core.lora_read import load_lora
    from weightsmith.core.merge import merge, MergeOptions, save_merge

    model = load_model("sd15.safetensors")
    loras = [load_lora("a.safetensors", model), load_lora("b.safetensors", model)]
    edit = merge(model, loras, method="iteris", prompts=[["a photo of zq"], ["zx style"]],
                 options=MergeOptions(iterations=8, samples=8))
    edit.report["curve"]                          # per-iteration objective and change
    save_merge(edit, model, "merged.safetensors", loras=loras)   # exact LoRA of rank Σ r_i

See docs/merge.md.
"""

from .options import METHODS, MergeOptions

__all__ = ["merge", "save_merge", "MergeOptions", "METHODS", "merged_tag_frequency"]


def __getattr__(name):  # torch is imported on first use, so the options load without it
    if name in ("merge", "save_merge", "merged_tag_frequency"):
        from . import api

        return getattr(api, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
