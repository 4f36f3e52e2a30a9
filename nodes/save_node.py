"""Weightsmith · Save Edit as LoRA: write an edit as a kohya-format LoRA in ``output/loras``.

kohya names with ``.alpha`` (not ComfyUI's internal ``diffusion_model.*`` keys) so the file loads in
ComfyUI's LoraLoader, A1111/Forge and diffusers. ``output/loras`` is added to ComfyUI's LoRA
search path when the pack loads, so the file shows up in LoraLoader right away.
"""

from __future__ import annotations

import os

from .common import CATEGORY, EDIT_TYPE, ui_text, user_errors

SUBFOLDER = "loras"


def lora_output_dir() -> str:
    import folder_paths

    return os.path.join(folder_paths.get_output_directory(), SUBFOLDER)


def register_output_loras() -> None:
    """Put output/loras on the LoRA search path (idempotent)."""
    import folder_paths

    d = lora_output_dir()
    try:
        folder_paths.add_model_folder_path("loras", d)
    except Exception:  # pragma: no cover - very old ComfyUI
        paths = folder_paths.folder_names_and_paths["loras"][0]
        if d not in paths:
            paths.append(d)


class WeightsmithSaveEditAsLora:
    DESCRIPTION = (
        "Save an edit (from Erase Concepts or IterIS Merge) as a kohya-format LoRA in output/loras. "
        "It loads in ComfyUI's Load LoRA, A1111/Forge and diffusers. Exact when rank is 0. A Flux edit is "
        "written in the layout all three load (diffusers/PEFT names); its T5 part, which no LoRA layout "
        "carries to every host, as a T5 encoder file beside it (load that with DualCLIPLoader)."
    )
    CATEGORY = CATEGORY
    FUNCTION = "run"
    OUTPUT_NODE = True
    RETURN_TYPES = ("STRING",)
    RETURN_NAMES = ("lora_name",)
    OUTPUT_TOOLTIPS = ("The saved file's name as Load LoRA lists it.",)

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "edit": (EDIT_TYPE, {"tooltip": "The edit to save."}),
                "filename_prefix": (
                    "STRING",
                    {
                        "default": "weightsmith/edit",
                        "tooltip": "File name prefix inside output/loras; a counter is added.",
                    },
                ),
                "rank": (
                    "INT",
                    {
                        "default": 0,
                        "min": 0,
                        "max": 4096,
                        "tooltip": "0 = exact (each module at the rank it needs). A smaller rank truncates "
                        "the SVD; the report gives the relative error.",
                    },
                ),
            }
        }

    def run(self, edit, filename_prefix, rank):
        import folder_paths

        from ..core.errors import WeightsmithError
        from ..core.lora_write import export_note, save_lora

        with user_errors():
            out_dir = lora_output_dir()
            os.makedirs(out_dir, exist_ok=True)
            try:
                folder, name, counter, sub, _ = folder_paths.get_save_image_path(filename_prefix, out_dir)
            except Exception as e:
                raise WeightsmithError(
                    f"filename prefix {filename_prefix!r} is not usable ({e}); use a "
                    "relative name such as weightsmith/edit."
                ) from None
            os.makedirs(folder, exist_ok=True)
            fname = f"{name}_{counter:05}_.safetensors"
            path = os.path.join(folder, fname)
            from ..core.blockweights import file_metadata

            flux = {}
            if edit.family == "flux":  # a T5 change is written as a T5 file beside the LoRA (docs/flux_lora.md)
                base, prefix = getattr(edit, "host_t5_base", (None, ""))
                flux = {"t5_base": base, "t5_prefix": prefix}
            info = save_lora(edit, path, rank=int(rank) or None, metadata=file_metadata(edit.report), **flux)
            register_output_loras()
            lora_name = os.path.join(sub, fname) if sub else fname
            if info.get("lora_file", path) is None:  # a Flux edit of T5 alone: only the T5 file
                lora_name = ""
            text = (
                f"saved {os.path.join(SUBFOLDER, lora_name) if lora_name else info.get('t5_file')}\n"
                f"modules: {len(info['errors'])}, rank: {info['rank']}, {export_note(info)}"
                + (f"\nload it with Load LoRA as {lora_name!r}" if lora_name else "")
            )
        return {"ui": ui_text(text), "result": (lora_name.replace(os.sep, "/"),)}
