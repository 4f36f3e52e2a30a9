"""Deterministic renderer of the embedded default world ("shapes world").

Images are small (32x32 by default) pictures of one or two flat objects on a plain
background. Every object has a shape, a colour, a size, a position and a fill pattern.
Everything is a pure function of the :class:`Scene` and an integer seed (the seed only
drives a +-1 px position jitter), so renders are bit-for-bit reproducible.

Reserved attributes: the shape ``"star"`` and the pattern ``"stripes"`` are never used in
the base model's training data (:data:`BASE_SHAPES`, :data:`BASE_PATTERNS`); they are what
the two example LoRAs teach.

Public API
----------
- vocabularies: :data:`SHAPES`, :data:`BASE_SHAPES`, :data:`NEW_SHAPE`, :data:`COLOURS`,
  :data:`BACKGROUNDS`, :data:`SIZES`, :data:`POSITIONS`, :data:`PATTERNS`,
  :data:`BASE_PATTERNS`, :data:`NEW_PATTERN`, :data:`SUBJECT_TRIGGER`, :data:`STYLE_TRIGGER`
- :class:`Obj`, :class:`Scene`
- :func:`render(scene, seed=0, size=32) -> np.ndarray` (H, W, 3) uint8
- :func:`render_batch(scenes, seeds, size=32) -> np.ndarray` (N, H, W, 3) uint8
- :func:`to_tensor(images) -> torch.Tensor` (N, 3, H, W) float in [0, 1]
- :func:`random_scene(rng, ...) -> Scene`
- :func:`prompt_for(scene, rng=None, template=None, ...) -> str`
- :func:`simple_prompt(colour, shape, ...) -> str`, :func:`compositional_prompt(...)`
- :func:`simple_prompts() -> list[(prompt, colour, shape)]` all simple evaluation prompts
- :func:`prompt_corpus() -> list[str]` every word the prompts can use (tokenizer vocab)
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

# --------------------------------------------------------------------------- vocab
BASE_SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "cross", "diamond")
NEW_SHAPE = "star"  # reserved: absent from base training, taught by the subject LoRA
SHAPES: tuple[str, ...] = BASE_SHAPES + (NEW_SHAPE,)

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (225, 35, 35),
    "green": (35, 185, 55),
    "blue": (45, 85, 235),
    "yellow": (245, 225, 35),
    "purple": (150, 55, 205),
    "orange": (250, 140, 25),
    "cyan": (35, 205, 215),
}
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "black": (12, 12, 12),
    "white": (242, 242, 242),
    "gray": (120, 120, 120),
}
SIZES: tuple[str, ...] = ("small", "large")
POSITIONS: tuple[str, ...] = ("center", "left", "right", "top", "bottom")
BASE_PATTERNS: tuple[str, ...] = ("plain",)
NEW_PATTERN = "stripes"  # reserved: absent from base training, taught by the style LoRA
PATTERNS: tuple[str, ...] = BASE_PATTERNS + (NEW_PATTERN,)

#: trigger word of the subject LoRA (used in place of the shape noun: "a red zq")
SUBJECT_TRIGGER = "zq"
#: trigger phrase of the style LoRA (appended: "a red circle, zx style")
STYLE_TRIGGER = "zx style"
#: triggers of the interfering pair (the same two traits, LoRAs trained without regularization)
SUBJECT_TRIGGER_NOREG = "zk"
STYLE_TRIGGER_NOREG = "zv style"

# geometry, in units of the output image size (32 px reference)
_CENTRES = {
    "center": (16.0, 16.0),
    "left": (9.0, 16.0),
    "right": (23.0, 16.0),
    "top": (16.0, 9.0),
    "bottom": (16.0, 23.0),
}
_RADIUS_CENTRED = {"small": 7.0, "large": 11.0}
_RADIUS_PLACED = {"small": 5.0, "large": 7.0}
_STRIPE_PERIOD = 6.0  # px at 32 px: 3 px object colour, 3 px contrast colour
_SS = 4  # supersampling factor
_JITTER = 1.0


@dataclass(frozen=True)
class Obj:
    shape: str
    colour: str
    size: str = "large"
    position: str = "center"
    pattern: str = "plain"

    def __post_init__(self):
        if self.shape not in SHAPES:
            raise ValueError(f"unknown shape {self.shape!r}")
        if self.colour not in COLOURS:
            raise ValueError(f"unknown colour {self.colour!r}")
        if self.size not in SIZES:
            raise ValueError(f"unknown size {self.size!r}")
        if self.position not in POSITIONS:
            raise ValueError(f"unknown position {self.position!r}")
        if self.pattern not in PATTERNS:
            raise ValueError(f"unknown pattern {self.pattern!r}")


@dataclass(frozen=True)
class Scene:
    objects: tuple[Obj, ...]
    background: str = "black"

    def __post_init__(self):
        if not 1 <= len(self.objects) <= 2:
            raise ValueError("a scene has 1 or 2 objects")
        if self.background not in BACKGROUNDS:
            raise ValueError(f"unknown background {self.background!r}")
        pos = [o.position for o in self.objects]
        if len(set(pos)) != len(pos):
            raise ValueError("two objects at the same position")
        if len(self.objects) == 2 and "center" in pos:
            raise ValueError("two-object scenes use left/right or top/bottom")


# --------------------------------------------------------------------------- drawing
def _polygon(shape: str, cx: float, cy: float, r: float) -> list[tuple[float, float]] | None:
    if shape == "square":
        h = 0.82 * r
        return [(cx - h, cy - h), (cx + h, cy - h), (cx + h, cy + h), (cx - h, cy + h)]
    if shape == "triangle":
        return [(cx, cy - r), (cx + 0.97 * r, cy + 0.8 * r), (cx - 0.97 * r, cy + 0.8 * r)]
    if shape == "diamond":
        return [(cx, cy - r), (cx + 0.72 * r, cy), (cx, cy + r), (cx - 0.72 * r, cy)]
    if shape == "cross":
        a, w = r, 0.34 * r
        return [
            (cx - w, cy - a),
            (cx + w, cy - a),
            (cx + w, cy - w),
            (cx + a, cy - w),
            (cx + a, cy + w),
            (cx + w, cy + w),
            (cx + w, cy + a),
            (cx - w, cy + a),
            (cx - w, cy + w),
            (cx - a, cy + w),
            (cx - a, cy - w),
            (cx - w, cy - w),
        ]
    if shape == "star":
        pts = []
        for k in range(10):
            ang = -math.pi / 2 + k * math.pi / 5
            rr = r * 1.05 if k % 2 == 0 else r * 0.45
            pts.append((cx + rr * math.cos(ang), cy + rr * math.sin(ang)))
        return pts
    return None  # circle


def _stripe_contrast(background: str) -> tuple[int, int, int]:
    return (250, 250, 250) if background == "black" else (10, 10, 10)


def render(scene: Scene, seed: int = 0, size: int = 32) -> np.ndarray:
    """Render ``scene`` to an (size, size, 3) uint8 array. Deterministic in (scene, seed)."""
    rng = random.Random(int(seed) * 7919 + 17)
    S = size * _SS
    k = S / 32.0  # scale from the 32 px reference geometry
    img = Image.new("RGB", (S, S), BACKGROUNDS[scene.background])
    for obj in scene.objects:
        cx, cy = _CENTRES[obj.position]
        cx += rng.uniform(-_JITTER, _JITTER)
        cy += rng.uniform(-_JITTER, _JITTER)
        radii = _RADIUS_CENTRED if obj.position == "center" else _RADIUS_PLACED
        r = radii[obj.size] * k
        cx, cy = cx * k, cy * k
        mask = Image.new("L", (S, S), 0)
        d = ImageDraw.Draw(mask)
        poly = _polygon(obj.shape, cx, cy, r)
        if poly is None:
            d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=255)
        else:
            d.polygon(poly, fill=255)
        fill = Image.new("RGB", (S, S), COLOURS[obj.colour])
        if obj.pattern == "stripes":
            fd = ImageDraw.Draw(fill)
            period = _STRIPE_PERIOD * k
            contrast = _stripe_contrast(scene.background)
            y = 0.0
            while y < S:
                fd.rectangle([0, int(round(y + period / 2)), S, int(round(y + period)) - 1], fill=contrast)
                y += period
        img.paste(fill, (0, 0), mask)
    img = img.resize((size, size), Image.BOX)
    return np.asarray(img, dtype=np.uint8).copy()


def render_batch(scenes: Sequence[Scene], seeds: Iterable[int] | None = None, size: int = 32) -> np.ndarray:
    """Render many scenes -> (N, size, size, 3) uint8. ``seeds`` defaults to 0..N-1."""
    seeds = list(range(len(scenes))) if seeds is None else list(seeds)
    return np.stack([render(s, sd, size) for s, sd in zip(scenes, seeds)])


def to_tensor(images):
    """uint8 (N,H,W,3) / (H,W,3) array -> float torch tensor (N,3,H,W) in [0,1]."""
    import torch

    a = np.asarray(images)
    if a.ndim == 3:
        a = a[None]
    return torch.from_numpy(a).permute(0, 3, 1, 2).float().div(255.0)


# --------------------------------------------------------------------------- scenes
def random_scene(
    rng: random.Random,
    shapes: Sequence[str] = BASE_SHAPES,
    patterns: Sequence[str] = BASE_PATTERNS,
    p_two: float = 0.3,
    p_placed: float = 0.15,
    colours: Sequence[str] | None = None,
    backgrounds: Sequence[str] | None = None,
) -> Scene:
    """Draw a random scene: one centred object, one placed object, or two objects
    (left/right or top/bottom)."""
    colours = list(colours or COLOURS)
    backgrounds = list(backgrounds or BACKGROUNDS)
    bg = rng.choice(backgrounds)

    def obj(pos):
        return Obj(rng.choice(list(shapes)), rng.choice(colours), rng.choice(SIZES), pos, rng.choice(list(patterns)))

    u = rng.random()
    if u < p_two:
        a, b = rng.choice([("left", "right"), ("top", "bottom")])
        o1 = obj(a)
        o2 = obj(b)
        while (o2.shape, o2.colour) == (o1.shape, o1.colour):
            o2 = obj(b)
        return Scene((o1, o2), bg)
    if u < p_two + p_placed:
        return Scene((obj(rng.choice(POSITIONS[1:])),), bg)
    return Scene((obj("center"),), bg)


# --------------------------------------------------------------------------- prompts
_PATTERN_WORD = {"plain": "", "stripes": "striped"}

SIMPLE_TEMPLATES = (
    "a {colour} {shape}",
    "{colour} {shape}",
    "a {size} {colour} {shape}",
    "a picture of a {colour} {shape}",
    "a {colour} {shape} on a {bg} background",
    "a {size} {colour} {shape} on a {bg} background",
)
PLACED_TEMPLATES = (
    "a {colour} {shape} on the {pos}",
    "a {size} {colour} {shape} on the {pos}",
    "a {colour} {shape} on the {pos}, on a {bg} background",
    "a {size} {colour} {shape} on the {pos}, on a {bg} background",
)
TWO_TEMPLATES = (
    "a {c1} {s1} on the {p1} and a {c2} {s2} on the {p2}",
    "a {z1} {c1} {s1} on the {p1} and a {z2} {c2} {s2} on the {p2}",
    "a {c1} {s1} on the {p1} and a {c2} {s2} on the {p2}, on a {bg} background",
    "a {z1} {c1} {s1} on the {p1} and a {z2} {c2} {s2} on the {p2}, on a {bg} background",
)
# more phrasings for the World v2 recipe (``train_model --world v2``; not used by the shipped model)
_V2_SIMPLE = (
    "an image of a {colour} {shape}",
    "a photo of a {size} {colour} {shape}",
    "a drawing of a {colour} {shape} on a {bg} background",
    "one {size} {colour} {shape} in the center",
    "a {bg} background with a {size} {colour} {shape}",
)
_V2_PLACED = (
    "a picture of a {colour} {shape} on the {pos}",
    "a drawing of a {size} {colour} {shape} on the {pos} of a {bg} background",
    "a {bg} background with a {size} {colour} {shape} on the {pos}",
)
_V2_TWO = (
    "a picture of a {c1} {s1} on the {p1} and a {c2} {s2} on the {p2}",
    "a {bg} background with a {z1} {c1} {s1} on the {p1} and a {z2} {c2} {s2} on the {p2}",
)
#: template pools per world recipe: (centred object, placed object, two objects)
TEMPLATE_SETS = {
    "v1": (SIMPLE_TEMPLATES, PLACED_TEMPLATES, TWO_TEMPLATES),
    "v2": (SIMPLE_TEMPLATES + _V2_SIMPLE, PLACED_TEMPLATES + _V2_PLACED, TWO_TEMPLATES + _V2_TWO),
}


def _noun(o: Obj, subject_trigger: bool, subject_word: str = SUBJECT_TRIGGER) -> str:
    if subject_trigger and o.shape == NEW_SHAPE:
        return subject_word
    return o.shape


def prompt_for(
    scene: Scene,
    rng: random.Random | None = None,
    template: str | None = None,
    subject_trigger: bool = True,
    style_trigger: bool = True,
    subject_word: str = SUBJECT_TRIGGER,
    style_phrase: str = STYLE_TRIGGER,
    templates: str = "v1",
) -> str:
    """A prompt describing ``scene`` from one of the templates (random if ``rng`` given,
    else the first matching template unless ``template`` is given).

    With ``subject_trigger`` a star is called by the subject trigger word (``subject_word``,
    default ``"zq"``); with ``style_trigger`` a scene whose objects are striped gets the style
    trigger phrase appended (``", " + style_phrase``, default ``", zx style"``). ``templates``
    picks the pool of :data:`TEMPLATE_SETS` a random template comes from."""
    simple_pool, placed_pool, two_pool = TEMPLATE_SETS[templates]
    objs = scene.objects
    if len(objs) == 1:
        o = objs[0]
        pool = simple_pool if o.position == "center" else placed_pool
        t = template or (rng.choice(pool) if rng else pool[0])
        p = t.format(
            colour=o.colour,
            shape=_noun(o, subject_trigger, subject_word),
            size=o.size,
            bg=scene.background,
            pos=o.position,
        )
    else:
        o1, o2 = objs
        t = template or (rng.choice(two_pool) if rng else two_pool[0])
        p = t.format(
            c1=o1.colour,
            s1=_noun(o1, subject_trigger, subject_word),
            p1=o1.position,
            z1=o1.size,
            c2=o2.colour,
            s2=_noun(o2, subject_trigger, subject_word),
            p2=o2.position,
            z2=o2.size,
            bg=scene.background,
        )
    if style_trigger and any(o.pattern == NEW_PATTERN for o in objs):
        p = p + ", " + style_phrase
    return p


def simple_prompt(colour: str, shape: str, size: str | None = None, background: str | None = None) -> str:
    """``"a red circle"``, ``"a small red circle"``, ``"a red circle on a black background"``."""
    s = f"a {size + ' ' if size else ''}{colour} {shape}"
    if background:
        s += f" on a {background} background"
    return s


def compositional_prompt(o1: Obj, o2: Obj, background: str | None = None) -> str:
    """``"a small blue square on the left and a green triangle on the right, on a black background"``."""
    s = (
        f"a {o1.size} {o1.colour} {o1.shape} on the {o1.position} "
        f"and a {o2.size} {o2.colour} {o2.shape} on the {o2.position}"
    )
    if background:
        s += f", on a {background} background"
    return s


def simple_prompts(shapes: Sequence[str] = BASE_SHAPES) -> list[tuple[str, str, str]]:
    """All ``("a {colour} {shape}", colour, shape)`` evaluation prompts."""
    return [(simple_prompt(c, s), c, s) for s in shapes for c in COLOURS]


def prompt_corpus(templates: str = "v1") -> list[str]:
    """Every word a prompt from this module may contain (plus a few spare words)."""
    words = set()
    for t in sum(TEMPLATE_SETS[templates], ()):
        for w in t.replace(",", " ").split():
            if "{" not in w:
                words.add(w)
    words |= set(SHAPES) | set(COLOURS) | set(BACKGROUNDS) | set(SIZES) | set(POSITIONS)
    words |= {
        SUBJECT_TRIGGER,
        *STYLE_TRIGGER.split(),
        "striped",
        "stripes",
        "plain",
        "pattern",
        "with",
        "an",
        "image",
        "of",
        "photo",
        "shape",
        "object",
        "in",
        "style",
        "big",
        "tiny",
        "dotted",
        "dots",
        "grey",
        "pink",
        "brown",
        "dog",
        "cat",
        "car",
        "tree",
        "house",
        "person",
        "painting",
        "art",
        "artist",
        "center",
        "middle",
        "two",
        "one",
        "objects",
    }
    if templates != "v1":  # spare trigger words, single tokens from the start
        words |= {"zy", "zw", "zv", "zk", "sks", "ohwx", "checkered", "dots"}
    return sorted(words)
