"""Measuring erasure and merging on the embedded default world (shared by the demo and the
quality benchmark). Every figure is read off generated images by the shipped judge.

Erasure (target ``circle`` → anchor ``square`` by default):
- ``target_simple`` / ``target_complex``: rate at which the judge still finds the target on simple
  prompts ("a red circle") and on held-out compositional prompts that were not used for the edit
  (lower is better);
- ``anchor``: rate at which the anchor appears instead on the simple target prompts;
- ``preserved``: accuracy (shape and colour read correctly) on prompts of the other shapes;
- ``drift``: mean absolute pixel distance between base and edited images on those unrelated
  prompts at the same seeds (0 = untouched).

Merging (subject LoRA: trigger ``zq`` → star; style LoRA: ``zx style`` → stripes):
- ``subject`` / ``style``: rates of the star / of stripes on prompts with one trigger;
- ``both``: rate of striped stars on prompts with both triggers;
- ``drift``: pixel distance to the base model on prompts with neither trigger.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .render import COLOURS, NEW_PATTERN, NEW_SHAPE, STYLE_TRIGGER, SUBJECT_TRIGGER

ERASE_TARGET, ERASE_ANCHOR = "circle", "square"
PRESERVE_SHAPES = ("triangle", "cross", "diamond")
COLOUR_LIST = tuple(COLOURS)
POS_PAIRS = (("left", "right"), ("top", "bottom"), ("right", "left"))


def _default_guidance() -> float:
    import inspect

    from .sample import sample

    return float(inspect.signature(sample).parameters["guidance"].default)


@dataclass
class Sampler:
    """Samples a model of the world with the world's own defaults (see sample.py)."""

    steps: int = 20
    guidance: float = field(default_factory=_default_guidance)

    def __call__(self, model, prompts, seeds) -> torch.Tensor:
        from .sample import sample

        return sample(model.unet, model.text_encoders["text_encoder"], model.tokenizers["text_encoder"],
                      model.scheduler, prompts, seeds, steps=self.steps, guidance=self.guidance)


def erase_prompt_sets(n: int, target: str = ERASE_TARGET):
    """(simple target prompts, complex held-out target prompts, preserved prompts+labels)."""
    simple = [f"a {COLOUR_LIST[i % len(COLOUR_LIST)]} {target}" for i in range(n)]
    complex_ = []
    for i in range(n):
        c1, c2 = COLOUR_LIST[i % len(COLOUR_LIST)], COLOUR_LIST[(i + 3) % len(COLOUR_LIST)]
        other = PRESERVE_SHAPES[i % len(PRESERVE_SHAPES)]
        p1, p2 = POS_PAIRS[i % len(POS_PAIRS)]
        bg = ("black", "white", "gray")[i % 3]
        complex_.append(f"a small {c1} {target} on the {p1} and a large {c2} {other} on the {p2}, on a {bg} background")
    preserved = []
    for i in range(n):
        shape = PRESERVE_SHAPES[i % len(PRESERVE_SHAPES)]
        colour = COLOUR_LIST[(i * 2) % len(COLOUR_LIST)]
        preserved.append((f"a {colour} {shape}", shape, colour))
    return simple, complex_, preserved


def erasure_metrics(base, models: dict, n: int = 14, seed0: int = 100, sampler: Sampler | None = None,
                    target: str = ERASE_TARGET, anchor: str = ERASE_ANCHOR, keep_images: bool = False) -> dict:
    """Metrics for ``{"base": base, method: edited model, ...}`` (see module docstring)."""
    from .judge import judge
    from .metrics import concept_rate, image_drift

    sampler = sampler or Sampler()
    simple, complex_, preserved = erase_prompt_sets(n, target)
    seeds = list(range(seed0, seed0 + n))
    out, images = {}, {}
    base_pres = None
    for name, model in {"base": base, **models}.items():
        imgs_s = sampler(model, simple, seeds)
        imgs_c = sampler(model, complex_, seeds)
        imgs_p = sampler(model, [p for p, _, _ in preserved], seeds)
        if base_pres is None:
            base_pres = imgs_p
        reads = judge(imgs_p)
        ok = [any(o["shape"] == s and o["colour"] == c for o in r["objects"]) for r, (_, s, c) in zip(reads, preserved)]
        out[name] = {
            "target_simple": concept_rate(imgs_s, shape=target),
            "target_complex": concept_rate(imgs_c, shape=target),
            "anchor": concept_rate(imgs_s, shape=anchor),
            "preserved": sum(ok) / len(ok),
            "drift": image_drift(base_pres, imgs_p),
        }
        if keep_images:
            images[name] = (imgs_s, imgs_c, imgs_p)
    return {"metrics": out, "n_per_set": n, "seeds": [seed0, seed0 + n - 1], "steps": sampler.steps,
            "guidance": sampler.guidance, "target": target, "anchor": anchor,
            **({"images": images} if keep_images else {})}


def merge_prompt_sets(n: int):
    subj, style, both, neither = [], [], [], []
    for i in range(n):
        c = COLOUR_LIST[i % len(COLOUR_LIST)]
        subj.append(f"a {c} {SUBJECT_TRIGGER}")
        s2 = PRESERVE_SHAPES[i % len(PRESERVE_SHAPES)]
        style.append(f"a {c} {s2}, {STYLE_TRIGGER}")
        both.append(f"a {c} {SUBJECT_TRIGGER}, {STYLE_TRIGGER}")
        neither.append(f"a {c} {('circle', 'square', 'triangle')[i % 3]}")
    return subj, style, both, neither


def merge_sample_prompts(n: int = 4) -> list[list[str]]:
    """The sample prompts IterIS gets for [subject LoRA, style LoRA] (the issue's "LoRAs with
    sample prompts"): trigger prompts phrased unlike the evaluation prompts of
    :func:`merge_prompt_sets` (with a background; the style on circles/squares, evaluated on the
    other shapes). Without them the merge falls back to the LoRAs' ``ss_tag_frequency``, whose
    comma-split sentence captions make poor prompts."""
    bgs = ("black", "white", "gray")
    subj = [f"a {COLOUR_LIST[i % len(COLOUR_LIST)]} {SUBJECT_TRIGGER} on a {bgs[i % 3]} background" for i in range(n)]
    style = [f"a {COLOUR_LIST[(i + 2) % len(COLOUR_LIST)]} {('circle', 'square')[i % 2]} on a {bgs[(i + 1) % 3]} "
             f"background, {STYLE_TRIGGER}" for i in range(n)]
    return [subj, style]


def merge_metrics(base, models: dict, n: int = 14, seed0: int = 300, sampler: Sampler | None = None,
                  keep_images: bool = False) -> dict:
    from .metrics import concept_rate, image_drift

    sampler = sampler or Sampler()
    subj, style, both, neither = merge_prompt_sets(n)
    seeds = list(range(seed0, seed0 + n))
    out, images = {}, {}
    base_neither = None
    for name, model in {"base": base, **models}.items():
        i_s, i_t, i_b, i_n = (sampler(model, ps, seeds) for ps in (subj, style, both, neither))
        if base_neither is None:
            base_neither = i_n
        out[name] = {
            "subject": concept_rate(i_s, shape=NEW_SHAPE),
            "style": concept_rate(i_t, pattern=NEW_PATTERN),
            "both": concept_rate(i_b, shape=NEW_SHAPE, pattern=NEW_PATTERN),
            "drift": image_drift(base_neither, i_n),
        }
        if keep_images:
            images[name] = (i_s, i_t, i_b, i_n)
    return {"metrics": out, "n_per_set": n, "seeds": [seed0, seed0 + n - 1], "steps": sampler.steps,
            "guidance": sampler.guidance, **({"images": images} if keep_images else {})}


def with_lora(model, lora, weight: float = 1.0):
    """A copy of ``model`` with one LoRA applied at ``weight`` (what a LoRA loader does)."""
    from ..edit import Edit

    return Edit(model.family, dict(model.unet_config), lora.deltas()).apply(model, weight)
