"""Attack success on the embedded world, read by its judge (docs/robustness.md, "On the world").

The world's concepts are shapes, so an attack on an erased shape succeeds on an image when the judge
finds that shape in it (any colour, place or size). Images are drawn with the attack's conditioning by
:func:`..engine.draw` (the world's own sampler: same noise per seed, DDIM, guidance with ``""``).
"""

from __future__ import annotations

import torch

from ..errors import require
from .engine import draw


def world_shape(target: str) -> str | None:
    """The judge's shape for ``target`` when it names one of the world's shapes, else None."""
    from ..world.judge import SHAPE_CLASSES

    t = " ".join(target.lower().split())
    return t if t in SHAPE_CLASSES[1:] else None


def attack_images(base, edited, result, templates: list[str], seeds, steps: int, guidance: float, check=None):
    """Images (float [0, 1], N × 3 × H × W) that ``edited`` draws under the attack, template ``i % len``
    at ``seeds[i]``."""
    seeds = list(seeds)
    tpls = [templates[i % len(templates)] for i in range(len(seeds))]
    cond = result.conditioning(base, edited, tpls)
    x = draw(edited, cond, seeds, steps, guidance, check=check)
    return ((x + 1) / 2).clamp(0, 1)


def success(images, target: str) -> dict:
    """``{"rate", "k", "n", "ci"}``: the judge finds the target shape (Wilson 95% interval)."""
    from ..world.metrics import concept_hits, rate_ci

    shape = world_shape(target)
    require(shape is not None, f"{target!r} is not a shape of the embedded world; its judge cannot read it.")
    return rate_ci(concept_hits(images, shape=shape))


def plain_images(model, prompts: list[str], seeds, steps: int, guidance: float) -> torch.Tensor:
    """The world's images of plain ``prompts`` (for the unattacked baseline), as :func:`attack_images`."""
    from .engine import encode

    with torch.no_grad():
        cond = encode(model, list(prompts))
    return ((draw(model, cond, list(seeds), steps, guidance) + 1) / 2).clamp(0, 1)
