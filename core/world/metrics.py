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
- :func:`scene_prompt_quality(model, kind, n, ...) -> dict`: the model card's compositional bars:
  one object with size, position and background in the prompt (``kind="context"``: everything
  right) and two-object prompts (``kind="two"``: both objects' shape and colour at their places).
- :func:`wilson(k, n) -> (lo, hi)`: 95% Wilson score interval of a rate; :func:`rate_ci(hits)`
  and :func:`mean_ci(values)`: ``{"rate"|"mean", "n", "ci": [lo, hi]}``.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence

import numpy as np

from .judge import JudgeNet, judge, prepare
from .render import BASE_SHAPES, simple_prompts


def wilson(k: int, n: int, z: float = 1.959964) -> tuple[float, float]:
    """95% Wilson score interval of ``k`` successes in ``n`` trials (``(nan, nan)`` for n = 0)."""
    if n <= 0:
        return float("nan"), float("nan")
    p = k / n
    den = 1 + z * z / n
    mid = (p + z * z / (2 * n)) / den
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / den
    return max(0.0, mid - half), min(1.0, mid + half)


def rate_ci(hits: Sequence[bool]) -> dict:
    """``{"rate", "k", "n", "ci"}`` of a list of per-image hits (Wilson 95%)."""
    k, n = int(sum(bool(h) for h in hits)), len(hits)
    lo, hi = wilson(k, n)
    return {"rate": k / n if n else float("nan"), "k": k, "n": n, "ci": [lo, hi]}


def mean_ci(values: Sequence[float]) -> dict:
    """``{"mean", "n", "ci"}``: mean with a normal-approximation 95% interval."""
    v = np.asarray(values, dtype=np.float64)
    n = len(v)
    m = float(v.mean()) if n else float("nan")
    h = 1.959964 * float(v.std(ddof=1)) / math.sqrt(n) if n > 1 else float("nan")
    return {"mean": m, "n": n, "ci": [m - h, m + h]}


def concept_hits(
    images,
    shape: str | None = None,
    colour: str | None = None,
    pattern: str | None = None,
    position: str | None = None,
    background: str | None = None,
    model: JudgeNet | None = None,
) -> list[bool]:
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


def concept_rate(
    images,
    shape: str | None = None,
    colour: str | None = None,
    pattern: str | None = None,
    position: str | None = None,
    background: str | None = None,
    model: JudgeNet | None = None,
) -> float:
    """Fraction of ``images`` showing an object with every given attribute (judge-read)."""
    h = concept_hits(images, shape, colour, pattern, position, background, model)
    return float(np.mean(h)) if h else float("nan")


def image_drifts(a, b) -> list[float]:
    """Per-image mean absolute pixel distance between two image batches."""
    x, y = prepare(a), prepare(b)
    if x.shape != y.shape:
        raise ValueError(f"shape mismatch {tuple(x.shape)} vs {tuple(y.shape)}")
    return (x - y).abs().flatten(1).mean(1).tolist()


def image_drift(a, b) -> float:
    """Mean absolute pixel distance between two image batches (float [0,1] or uint8)."""
    x, y = prepare(a), prepare(b)
    if x.shape != y.shape:
        raise ValueError(f"shape mismatch {tuple(x.shape)} vs {tuple(y.shape)}")
    return float((x - y).abs().mean())


def simple_prompt_quality(
    model,
    seeds_per_prompt: int = 4,
    steps: int = 25,
    guidance: float = 1.5,
    shapes: Sequence[str] = BASE_SHAPES,
    seed0: int = 1000,
    judge_model: JudgeNet | None = None,
) -> dict:
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
    return {
        "n": n,
        "both": both / n,
        "shape": shape_ok / n,
        "colour": colour_ok / n,
        "steps": steps,
        "guidance": guidance,
        "images": imgs,
    }


# the bars' prompts name everything the check reads (training phrasings of both recipes)
CONTEXT_TEMPLATES_BAR = ("a {size} {colour} {shape} on the {pos}, on a {bg} background",)
TWO_TEMPLATES_BAR = (
    "a {z1} {c1} {s1} on the {p1} and a {z2} {c2} {s2} on the {p2}, on a {bg} background",
    "a {c1} {s1} on the {p1} and a {c2} {s2} on the {p2}",
)


def scene_cases(kind: str, n: int, seed: int = 0, shapes: Sequence[str] = BASE_SHAPES):
    """``n`` (prompt, scene) pairs for the compositional bars (fixed seed)."""
    from .render import POSITIONS, prompt_for, random_scene

    rng = random.Random(seed)
    out = []
    for i in range(n):
        if kind == "context":
            sc = random_scene(rng, shapes=shapes, p_two=0.0, p_placed=1.0)
            o = sc.objects[0]
            t = CONTEXT_TEMPLATES_BAR[i % len(CONTEXT_TEMPLATES_BAR)]
            out.append((t.format(size=o.size, colour=o.colour, shape=o.shape, pos=o.position, bg=sc.background), sc))
        elif kind == "two":
            sc = random_scene(rng, shapes=shapes, p_two=1.0)
            out.append((prompt_for(sc, template=TWO_TEMPLATES_BAR[i % len(TWO_TEMPLATES_BAR)]), sc))
        else:
            raise ValueError(f"unknown kind {kind!r}")
    assert all(o.position in POSITIONS for _, sc in out for o in sc.objects)
    return out


def scene_hits(reads, scenes, kind: str) -> list[bool]:
    """Per image: ``context`` = the object's shape, colour, size, position and the background all
    right; ``two`` = both objects' shape and colour read at their prompted positions."""
    hits = []
    for r, sc in zip(reads, scenes):
        ok = True
        for o in sc.objects:
            if kind == "context":
                ok &= any(
                    x["position"] == o.position
                    and x["shape"] == o.shape
                    and x["colour"] == o.colour
                    and x["size"] == o.size
                    for x in r["objects"]
                )
            else:
                ok &= any(
                    x["position"] == o.position and x["shape"] == o.shape and x["colour"] == o.colour
                    for x in r["objects"]
                )
        if kind == "context":
            ok &= r["background"] == sc.background
        hits.append(bool(ok))
    return hits


def context_breakdown(reads, scenes, hits: list[bool]) -> dict:
    """What the ``context`` bar's misses get wrong: per attribute, the fraction of images on which
    an object of the prompted shape and colour is read (``shape_colour``), and of those, the fraction
    with the prompted position, size, and the background right; ``all`` is the bar itself (``hits``:
    :func:`scene_hits` of the same images)."""
    found = pos = size = bg = 0
    for r, sc in zip(reads, scenes):
        o = sc.objects[0]
        xs = [x for x in r["objects"] if x["shape"] == o.shape and x["colour"] == o.colour]
        if xs:
            found += 1
            pos += any(x["position"] == o.position for x in xs)
            size += any(x["size"] == o.size for x in xs)
        bg += r["background"] == sc.background
    n = len(scenes)
    return {
        "n": n,
        "shape_colour": found / n,
        "position_given_found": pos / max(1, found),
        "size_given_found": size / max(1, found),
        "background": bg / n,
        "all": sum(hits) / n,
    }


def scene_prompt_quality(
    model,
    kind: str,
    n: int = 140,
    steps: int = 25,
    guidance: float = 1.5,
    seed: int = 0,
    seed0: int = 2000,
    judge_model: JudgeNet | None = None,
) -> dict:
    """The compositional bars of the model card (see :func:`scene_hits`), with a Wilson 95% interval."""
    from .sample import sample

    cases = scene_cases(kind, n, seed)
    imgs = sample(
        model.unet,
        model.text_encoder,
        model.tokenizer,
        model.scheduler,
        [p for p, _ in cases],
        list(range(seed0, seed0 + n)),
        steps,
        guidance,
    )
    reads = judge(imgs, judge_model)
    hits = scene_hits(reads, [sc for _, sc in cases], kind)
    extra = {"breakdown": context_breakdown(reads, [sc for _, sc in cases], hits)} if kind == "context" else {}
    return {
        **rate_ci(hits),
        **extra,
        "kind": kind,
        "steps": steps,
        "guidance": guidance,
        "images": imgs,
        "prompts": [p for p, _ in cases],
    }
