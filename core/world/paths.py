"""Locations of the embedded default world's shipped assets."""

from pathlib import Path

ASSETS_DIR = Path(__file__).resolve().parent / "assets"
#: diffusers-format folder of the tiny pixel-space text-to-image model
DEFAULT_MODEL_DIR = ASSETS_DIR / "tiny-sd"
#: kohya-format subject LoRA: trigger word "zq" -> the new shape (star)
LORA_SUBJECT = ASSETS_DIR / "loras" / "subject_star.safetensors"
#: kohya-format style LoRA: trigger phrase "zx style" -> the new pattern (stripes)
LORA_STYLE = ASSETS_DIR / "loras" / "style_stripes.safetensors"
#: the interfering pair, trained like most community LoRAs (no regularization images), on the same
#: modules (attention, MLP, text encoder and 3x3 convs): trigger "zk" -> star, "zv style" -> stripes
LORA_SUBJECT_NOREG = ASSETS_DIR / "loras" / "subject_star_noreg.safetensors"
LORA_STYLE_NOREG = ASSETS_DIR / "loras" / "style_stripes_noreg.safetensors"
#: weights of the attribute-reading judge CNN
JUDGE_PATH = ASSETS_DIR / "judge.safetensors"


def world_present() -> bool:
    """Whether the embedded world's model and judge are on disk (a build may leave the assets out)."""
    return DEFAULT_MODEL_DIR.exists() and JUDGE_PATH.exists()


def require_world() -> None:
    """Refuse, with an error a person can act on, what needs the embedded world when it is missing."""
    if not world_present():
        from ..errors import WeightsmithError

        raise WeightsmithError(f"the embedded default world is missing ({DEFAULT_MODEL_DIR}).")


__all__ = [
    "ASSETS_DIR",
    "DEFAULT_MODEL_DIR",
    "LORA_SUBJECT",
    "LORA_STYLE",
    "LORA_SUBJECT_NOREG",
    "LORA_STYLE_NOREG",
    "JUDGE_PATH",
    "world_present",
    "require_world",
]
