"""Prompt sets for erasure: UCE's expansion templates, context templates and preserve captions.

docs/method.md, "Prompt sets" (prompt expansion, several prompts per concept, complex prompts that
put the concept in context, a shipped list of ordinary captions for preservation).
"""

from __future__ import annotations

ART_TEMPLATES = ("painting by {}", "art by {}", "artwork by {}", "picture by {}", "style of {}")
OBJECT_TEMPLATES = ("image of {}", "photo of {}", "portrait of {}", "picture of {}", "painting of {}")
CONTEXT_TEMPLATES = (
    "a detailed photo of {} in a city street at sunset",
    "{} next to a tree, high quality",
    "a picture of {} on the left and a house on the right",
)

# Ordinary captions whose features are preserved alongside the user's preserve concepts.
PRESERVE_CAPTIONS = (
    "a photo of a dog on the grass",
    "a house with a red roof",
    "a portrait of a woman in a garden",
    "a landscape with mountains and a river",
    "a bowl of fruit on a wooden table",
    "a city street at night",
    "a bird on a branch",
    "a car parked by the sea",
)

STYLE_HINTS = ("art", "style", "painting", "artwork", "drawing")


def concept_kind(anchor: str, kind: str = "auto") -> str:
    if kind in ("object", "style"):
        return kind
    a = anchor.strip().lower()
    return "style" if any(h in a.split() for h in STYLE_HINTS) else "object"


def templates_for(kind: str, expand: bool, extra: tuple[str, ...] = ()) -> list[str]:
    """Templates with one ``{}`` for the concept. Without expansion: the bare concept only."""
    ts = ["{}"]
    if expand:
        ts += list(ART_TEMPLATES if kind == "style" else OBJECT_TEMPLATES) + list(CONTEXT_TEMPLATES)
    ts += [t for t in extra if t not in ts]
    return ts


def fill(template: str, concept: str) -> str:
    return " ".join(template.format(concept).split())
