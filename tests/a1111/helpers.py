"""Shared helpers for the A1111/Forge tab tests (importable from the main env and the gradio-3 venv)."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def import_weightsmith():
    """Import the repo as the package ``weightsmith`` the way the A1111 entry script does (the
    clone's folder may have any name)."""
    if "weightsmith" in sys.modules:
        return sys.modules["weightsmith"]
    spec = importlib.util.spec_from_file_location(
        "weightsmith", REPO / "__init__.py", submodule_search_locations=[str(REPO)]
    )
    mod = importlib.util.module_from_spec(spec)
    sys.modules["weightsmith"] = mod
    spec.loader.exec_module(mod)
    return mod


def tiny_diffusers_folder(out: Path, family: str = "sd1", seed: int = 0) -> Path:
    """A tiny random model written as a diffusers folder (stand-in for the embedded world model)."""
    import_weightsmith()
    from weightsmith.core.lab.random_models import build_random_model

    m = build_random_model(family, "tiny", seed=seed)
    out = Path(out)
    m.unet.save_pretrained(out / "unet", safe_serialization=True)
    idx = {
        "_class_name": "StableDiffusionPipeline",
        "unet": ["diffusers", "UNet2DConditionModel"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
    }
    m.text_encoders["text_encoder"].save_pretrained(out / "text_encoder", safe_serialization=True)
    m.tokenizers["text_encoder"].save_pretrained(out / "tokenizer")
    if family == "sdxl":
        m.text_encoders["text_encoder_2"].save_pretrained(out / "text_encoder_2", safe_serialization=True)
        m.tokenizers["text_encoder_2"].save_pretrained(out / "tokenizer_2")
        idx.update(
            _class_name="StableDiffusionXLPipeline",
            text_encoder_2=["transformers", "CLIPTextModelWithProjection"],
            tokenizer_2=["transformers", "CLIPTokenizer"],
        )
    if m.scheduler is not None:
        m.scheduler.save_pretrained(out / "scheduler")
    (out / "model_index.json").write_text(json.dumps(idx))
    return out


def default_or_tiny_model(tmp: Path) -> Path:
    """The embedded world model when it is installed, else a tiny random diffusers folder."""
    import_weightsmith()
    try:
        from weightsmith.core.world.paths import DEFAULT_MODEL_DIR

        if (Path(DEFAULT_MODEL_DIR) / "model_index.json").exists():
            return Path(DEFAULT_MODEL_DIR)
    except Exception:
        pass
    return tiny_diffusers_folder(Path(tmp) / "tiny-sd")
