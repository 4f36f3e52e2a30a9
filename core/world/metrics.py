"""Measurements on generated images of the default world (all judged by the shipped judge).

- :func:`concept_rate(images, shape=None, colour=None, pattern=None, position=None, background=None) -> float`
  fraction of images in which the judge finds an object with all the given attributes
  (``background`` is matched on the image); e.g. ``concept_rate(imgs, shape="star")``.
- :func:`concept_hits(...) -> list[bool]`: the same, per image.
- :func:`image_drift(a, b) -> float`: mean absolute pixel difference of two equally shaped
  image batches in [0, 1] (0 = identical, 1 = maximal), e.g. original vs edited model on the
  same prompts and seeds.
- :func:`simple_prompt_quality(model, seeds_per_prompt=4, ...) -> dict`: the model-card figure:
  fraction of "a {colour} {shape}" samples where the judge reads that shape and colour.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from .judge import JudgeNet, judge, prepare
from .render import BASE_SHAPES, simple_prompts


def concept_hits(images, shape: str | None = None, colour: str | None = None, pattern: str | None = None,
                 position: str | None = None, background: str | None = None,
                 model: JudgeNet | None = None) -> list[bool]:
    want = {k: v for k, v in (("shape", shape), ("colour", colour), ("pattern", pattern), ("position", position)) if v}
    if not want and background is None:
        raise ValueError("give at least one attribute")
    hits = []
    for r in judge(images, model):
        ok = background is None or r["background"] == background
        if want:
            ok = ok and any(all(o[k] == v for k, v in want.items()) for o in r["objects"])
        hits.append(bool(ok))
    return hits


def concept_rate(images, shape: str | None = None, colour: str | None = None, pattern: str | None = None,
                 position: str | None = None, background: str | None = None,
                 model: JudgeNet | None = None) -> float:
    """Fraction of ``images`` showing an object with every given attribute (judge-read)."""
    h = concept_hits(images, shape, colour, pattern, position, background, model)
    return float(np.mean(h)) if h else float("nan")


def image_drift(a, b) -> float:
    """Mean absolute pixel distance between two image batches (float [0,1] or uint8)."""
    x, y = prepare(a), prepare(b)
    if x.shape != y.shape:
        raise ValueError(f"shape mismatch {tuple(x.shape)} vs {tuple(y.shape)}")
    return float((x - y).abs().mean())


def simple_prompt_quality(model, seeds_per_prompt: int = 4, steps: int = 25, guidance: float = 1.5,
                          shapes: Sequence[str] = BASE_SHAPES, seed0: int = 1000,
                          judge_model: JudgeNet | None = None) -> dict:
    """Sample every "a {colour} {shape}" prompt ``seeds_per_prompt`` times; report the fraction
    where the judge finds that shape+colour (``both``), the shape, and the colour."""
    from .sample import sample

    ps = simple_prompts(shapes)
    prompts, specs, seeds = [], [], []
    for j, (p, c, s) in enumerate(ps):
        for k in range(seeds_per_prompt):
            prompts.append(p)
            specs.append((c, s))
            seeds.append(seed0 + j * seeds_per_prompt + k)
    imgs = sample(model.unet, model.text_encoder, model.tokenizer, model.scheduler, prompts, seeds, steps, guidance)
    reads = judge(imgs, judge_model)
    both = shape_ok = colour_ok = 0
    for (c, s), r in zip(specs, reads):
        both += any(o["shape"] == s and o["colour"] == c for o in r["objects"])
        shape_ok += any(o["shape"] == s for o in r["objects"])
        colour_ok += any(o["colour"] == c for o in r["objects"])
    n = len(specs)
    return {"n": n, "both": both / n, "shape": shape_ok / n, "colour": colour_ok / n, "steps": steps, "guidance": guidance,
            "images": imgs}
