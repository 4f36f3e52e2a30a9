"""Locations of the embedded default world's shipped assets."""
from pathlib import Path

ASSETS_DIR = Path(__file__).resolve().parent / "assets"
#: diffusers-format folder of the tiny pixel-space text-to-image model
DEFAULT_MODEL_DIR = ASSETS_DIR / "tiny-sd"
#: kohya-format subject LoRA: trigger word "zq" -> the new shape (star)
LORA_SUBJECT = ASSETS_DIR / "loras" / "subject_star.safetensors"
#: kohya-format style LoRA: trigger phrase "zx style" -> the new pattern (stripes)
LORA_STYLE = ASSETS_DIR / "loras" / "style_stripes.safetensors"
#: weights of the attribute-reading judge CNN
JUDGE_PATH = ASSETS_DIR / "judge.safetensors"

__all__ = ["ASSETS_DIR", "DEFAULT_MODEL_DIR", "LORA_SUBJECT", "LORA_STYLE", "JUDGE_PATH"]
