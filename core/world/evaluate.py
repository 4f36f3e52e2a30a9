"""Measuring erasure and merging on the embedded default world (shared by the demo and the
quality benchmark). Every figure is read off generated images by the shipped judge, and every
rate comes with its sample size and a 95% Wilson interval (:func:`metrics.rate_ci`).

Evaluation prompts are **held out**: their templates differ from every prompt an edit or a merge
is computed from (the erasure's :data:`ERASE_TEMPLATES`, IterIS's :func:`merge_sample_prompts`).

Erasure (target ``circle`` → anchor ``square`` by default):
- ``target_simple`` / ``target_context`` / ``target_two``: rate at which the judge still finds the
  target on simple prompts ("a picture of a red circle"), on one-object prompts with size, position
  and background ("a small red circle on the left, on a gray background") and on
  two-object prompts with a preserved shape beside it (lower is better);
- ``anchor``: rate at which the anchor appears instead on the simple target prompts;
- ``other_in_two``: the other (preserved) object of the two-object prompts read right (shape and
  colour at its place);
- ``preserved``: accuracy (shape and colour read correctly) on prompts of the other shapes;
- ``drift``: mean absolute pixel distance between base and edited images on those prompts at the
  same seeds (0 = untouched), with a normal 95% interval.

Merging, on a pair of LoRAs (a subject LoRA: trigger → star; a style LoRA: trigger → stripes):
- ``subject`` / ``style``: rate of each LoRA's trait on prompts with its trigger;
- ``subject_leak`` / ``style_leak``: rate of the *other* LoRA's trait on those prompts (stripes on
  the subject prompts, a star on the style prompts);
- ``both``: rate of striped stars on prompts with both triggers;
- ``drift``: pixel distance to the base model on prompts with neither trigger.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .render import (
    COLOURS,
    NEW_PATTERN,
    NEW_SHAPE,
    SIZES,
    STYLE_TRIGGER,
    STYLE_TRIGGER_NOREG,
    SUBJECT_TRIGGER,
    SUBJECT_TRIGGER_NOREG,
)

ERASE_TARGET, ERASE_ANCHOR = "circle", "square"
PRESERVE_SHAPES = ("triangle", "cross", "diamond")
COLOUR_LIST = tuple(COLOURS)
BGS = ("black", "white", "gray")
PLACES = ("left", "right", "top", "bottom")
POS_PAIRS = (("left", "right"), ("top", "bottom"), ("right", "left"), ("bottom", "top"))

#: prompts the demo's and the benchmark's erasures are computed from ("{}" = the concept)
ERASE_TEMPLATES = (
    "a red {}",
    "a small blue {} on the left",
    "a large {} on a white background",
    "a green {} on the top and a yellow triangle on the bottom",
)
#: the option fields of the demo's erasure (``EraseOptions(**ERASE_OPTIONS)``): computed from
#: ERASE_TEMPLATES only, no prompt expansion, so the evaluation prompts stay held out
ERASE_OPTIONS = {"expand_prompts": False, "extra_templates": ERASE_TEMPLATES}

# held-out evaluation templates: training phrasings of the world (render.py), none of them an
# edit template (ERASE_TEMPLATES) or a merge sample template (merge_sample_prompts)
EVAL_SIMPLE = ("{c} {s}", "a picture of a {c} {s}", "a {z} {c} {s}")
EVAL_CONTEXT = (
    "a {z} {c} {s} on the {p}, on a {bg} background",
    "a {c} {s} on the {p}, on a {bg} background",
    "a {z} {c} {s} on a {bg} background",
)
EVAL_TWO = (
    "a {z1} {c1} {s1} on the {p1} and a {z2} {c2} {s2} on the {p2}, on a {bg} background",
    "a {c1} {s1} on the {p1} and a {c2} {s2} on the {p2}, on a {bg} background",
)

#: the LoRA pairs of the world: name -> (subject trigger word, style trigger phrase, LoRA paths)
PAIRS = {"clean": (SUBJECT_TRIGGER, STYLE_TRIGGER), "interfering": (SUBJECT_TRIGGER_NOREG, STYLE_TRIGGER_NOREG)}


def pair_paths(pair: str):
    from .paths import LORA_STYLE, LORA_STYLE_NOREG, LORA_SUBJECT, LORA_SUBJECT_NOREG

    return {"clean": (LORA_SUBJECT, LORA_STYLE), "interfering": (LORA_SUBJECT_NOREG, LORA_STYLE_NOREG)}[pair]


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

        return sample(
            model.unet,
            model.text_encoders["text_encoder"],
            model.tokenizers["text_encoder"],
            model.scheduler,
            prompts,
            seeds,
            steps=self.steps,
            guidance=self.guidance,
        )


def _pick(seq, i):
    return seq[i % len(seq)]


def erase_prompt_sets(n: int, target: str = ERASE_TARGET) -> dict:
    """Held-out evaluation prompts of an erasure, ``n`` per set:
    ``{"simple": [str], "context": [str], "two": [(prompt, other_shape, other_colour, other_pos)],
    "preserved": [(prompt, shape, colour)]}``."""
    simple, context, two, preserved = [], [], [], []
    for i in range(n):
        c, z, bg = _pick(COLOUR_LIST, i), _pick(SIZES, i // 2), _pick(BGS, i // 3)
        simple.append(_pick(EVAL_SIMPLE, i).format(c=c, s=target, z=z))
        context.append(_pick(EVAL_CONTEXT, i).format(c=c, s=target, z=z, p=_pick(PLACES, i // 3), bg=bg))
        other, c2 = _pick(PRESERVE_SHAPES, i), _pick(COLOUR_LIST, i + 3)
        p1, p2 = _pick(POS_PAIRS, i // 2)
        objs = [(c, target, p1, z), (c2, other, p2, _pick(SIZES, i // 2 + 1))]
        if i % 2:
            objs.reverse()
        (ca, sa, pa, za), (cb, sb, pb, zb) = objs
        two.append(
            (
                _pick(EVAL_TWO, i // 2).format(c1=ca, s1=sa, p1=pa, z1=za, c2=cb, s2=sb, p2=pb, z2=zb, bg=bg),
                other,
                c2,
                p2,
            )
        )
        shape, pc = _pick(PRESERVE_SHAPES, i), _pick(COLOUR_LIST, 2 * i)
        if i % 2 == 0:
            p = _pick(EVAL_SIMPLE, i // 2).format(c=pc, s=shape, z=z)
        else:
            p = _pick(EVAL_CONTEXT, i // 2).format(c=pc, s=shape, z=z, p=_pick(PLACES, i // 4), bg=bg)
        preserved.append((p, shape, pc))
    return {"simple": simple, "context": context, "two": two, "preserved": preserved}


def _result(metrics: dict, images: dict | None, n: int, seed0: int, sampler, **about) -> dict:
    """What :func:`erasure_metrics` and :func:`merge_metrics` return: the metrics, the sampling they
    came from, ``about`` (what was measured) and, when kept, the images."""
    return {
        "metrics": metrics,
        "n_per_set": n,
        "seeds": [seed0, seed0 + n - 1],
        "steps": sampler.steps,
        "guidance": sampler.guidance,
        **about,
        **({"images": images} if images is not None else {}),
    }


def erasure_metrics(
    base,
    models: dict,
    n: int = 14,
    seed0: int = 100,
    sampler: Sampler | None = None,
    target: str = ERASE_TARGET,
    anchor: str = ERASE_ANCHOR,
    keep_images: bool = False,
    only: tuple[str, ...] | None = None,
) -> dict:
    """Metrics for ``{"base": base, method: edited model, ...}`` (see module docstring).
    Each metric is ``{"rate"|"mean", "n", "ci": [lo, hi], ...}``. ``only``: the prompt sets drawn
    (of ``simple``, ``context``, ``two``, ``preserved``; default all); a metric is given when its set is."""
    from .judge import judge
    from .metrics import concept_hits, image_drifts, mean_ci, rate_ci

    sampler = sampler or Sampler()
    sets = erase_prompt_sets(n, target)
    if only is not None:
        sets = {k: v for k, v in sets.items() if k in only}
    seeds = list(range(seed0, seed0 + n))
    out, images = {}, {}
    base_pres = None
    for name, model in {"base": base, **models}.items():
        imgs = {k: sampler(model, [x if isinstance(x, str) else x[0] for x in v], seeds) for k, v in sets.items()}
        out[name] = {}
        if "simple" in imgs:
            out[name]["target_simple"] = rate_ci(concept_hits(imgs["simple"], shape=target))
        if "context" in imgs:
            out[name]["target_context"] = rate_ci(concept_hits(imgs["context"], shape=target))
        if "two" in imgs:
            reads_2 = judge(imgs["two"])
            other = [
                any(o["position"] == p and o["shape"] == s and o["colour"] == c for o in r["objects"])
                for r, (_, s, c, p) in zip(reads_2, sets["two"])
            ]
            out[name]["target_two"] = rate_ci(concept_hits(imgs["two"], shape=target))
        if "simple" in imgs:
            out[name]["anchor"] = rate_ci(concept_hits(imgs["simple"], shape=anchor))
        if "two" in imgs:
            out[name]["other_in_two"] = rate_ci(other)
        if "preserved" in imgs:
            if base_pres is None:
                base_pres = imgs["preserved"]
            reads_p = judge(imgs["preserved"])
            pres = [
                any(o["shape"] == s and o["colour"] == c for o in r["objects"])
                for r, (_, s, c) in zip(reads_p, sets["preserved"])
            ]
            out[name]["preserved"] = rate_ci(pres)
            out[name]["drift"] = mean_ci(image_drifts(base_pres, imgs["preserved"]))
        if keep_images:
            images[name] = imgs
    return _result(out, images if keep_images else None, n, seed0, sampler, target=target, anchor=anchor)


def merge_prompt_sets(n: int, pair: str = "clean") -> dict:
    """Held-out evaluation prompts of a merge of ``pair``, ``n`` per set."""
    word, phrase = PAIRS[pair]
    shapes = ("circle", "square") + PRESERVE_SHAPES
    t_subj = ("a picture of a {c} {w}", "{c} {w}", "a {z} {c} {w} on the {p}", "a {z} {c} {w}")
    t_style = ("a picture of a {c} {s}, {t}", "a {z} {c} {s} on the {p}, {t}", "a {z} {c} {s}, {t}")
    t_both = ("a picture of a {c} {w}, {t}", "a {z} {c} {w} on the {p}, {t}")
    t_none = ("a picture of a {c} {s}", "a {z} {c} {s} on the {p}", "a {z} {c} {s}")
    sets = {"subject": [], "style": [], "both": [], "neither": []}
    for i in range(n):
        kw = dict(
            c=_pick(COLOUR_LIST, i),
            z=_pick(SIZES, i // 2),
            p=_pick(PLACES, i // 3),
            w=word,
            t=phrase,
            s=_pick(shapes, i // 7 + i),
        )
        sets["subject"].append(_pick(t_subj, i).format(**kw))
        sets["style"].append(_pick(t_style, i).format(**kw))
        sets["both"].append(_pick(t_both, i).format(**kw))
        sets["neither"].append(_pick(t_none, i).format(**kw))
    return sets


def merge_sample_prompts(n: int = 4, pair: str = "clean") -> list[list[str]]:
    """The sample prompts IterIS gets for [subject LoRA, style LoRA] of ``pair`` (the issue's
    "LoRAs with sample prompts"): trigger prompts phrased unlike the evaluation prompts of
    :func:`merge_prompt_sets` ("... on a {bg} background", no other template). Without them the
    merge falls back to the LoRAs' ``ss_tag_frequency``."""
    word, phrase = PAIRS[pair]
    subj = [f"a {_pick(COLOUR_LIST, i)} {word} on a {_pick(BGS, i)} background" for i in range(n)]
    style = [
        f"a {_pick(COLOUR_LIST, i + 2)} {('circle', 'square')[i % 2]} on a {_pick(BGS, i + 1)} background, {phrase}"
        for i in range(n)
    ]
    return [subj, style]


def merge_metrics(
    base,
    models: dict,
    n: int = 14,
    seed0: int = 300,
    sampler: Sampler | None = None,
    keep_images: bool = False,
    pair: str = "clean",
) -> dict:
    from .metrics import concept_hits, image_drifts, mean_ci, rate_ci

    sampler = sampler or Sampler()
    sets = merge_prompt_sets(n, pair)
    seeds = list(range(seed0, seed0 + n))
    out, images = {}, {}
    base_neither = None
    for name, model in {"base": base, **models}.items():
        im = {k: sampler(model, v, seeds) for k, v in sets.items()}
        if base_neither is None:
            base_neither = im["neither"]
        out[name] = {
            "subject": rate_ci(concept_hits(im["subject"], shape=NEW_SHAPE)),
            "style": rate_ci(concept_hits(im["style"], pattern=NEW_PATTERN)),
            "subject_leak": rate_ci(concept_hits(im["subject"], pattern=NEW_PATTERN)),
            "style_leak": rate_ci(concept_hits(im["style"], shape=NEW_SHAPE)),
            "both": rate_ci(concept_hits(im["both"], shape=NEW_SHAPE, pattern=NEW_PATTERN)),
            "drift": mean_ci(image_drifts(base_neither, im["neither"])),
        }
        if keep_images:
            images[name] = im
    return _result(out, images if keep_images else None, n, seed0, sampler, pair=pair, triggers=list(PAIRS[pair]))


def value(m: dict) -> float:
    """The point value of a metric entry (rate or mean)."""
    return m["rate"] if "rate" in m else m["mean"]


def with_lora(model, lora, weight: float = 1.0):
    """A copy of ``model`` with one LoRA applied at ``weight`` (what a LoRA loader does)."""
    from ..edit import Edit

    return Edit(model.family, dict(model.unet_config), lora.deltas()).apply(model, weight)
