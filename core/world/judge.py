"""The judge: a small CNN that reads the default world's attributes off an image.

For each of the five object slots (:data:`render.POSITIONS`: center, left, right, top,
bottom) it predicts the shape (or "none"), colour, fill pattern and size of the object there,
plus the background colour of the image. Trained on renders only (``train_judge.py``),
shipped weights at :data:`paths.JUDGE_PATH`.

Public API
----------
- :func:`load_judge(path=JUDGE_PATH) -> JudgeNet` (cached, eval mode, CPU)
- :func:`judge(images, model=None) -> list[dict]`: per image
  ``{"background": str, "objects": [{"position", "shape", "colour", "pattern", "size", "p"}]}``
- :func:`judge_logits(images, model=None) -> dict[str, Tensor]`
- :func:`attribute_accuracy(scenes, images, model=None) -> dict[str, float]`
``images``: float tensor (N,3,H,W) in [0,1], or uint8 array (N,H,W,3) / (H,W,3); other
sizes than 32x32 are area-resized.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from .paths import JUDGE_PATH
from .render import BACKGROUNDS, COLOURS, PATTERNS, POSITIONS, SHAPES, SIZES, Scene

SLOTS: tuple[str, ...] = POSITIONS
SHAPE_CLASSES: tuple[str, ...] = ("none",) + SHAPES
COLOUR_CLASSES: tuple[str, ...] = tuple(COLOURS)
BG_CLASSES: tuple[str, ...] = tuple(BACKGROUNDS)
PATTERN_CLASSES: tuple[str, ...] = PATTERNS
SIZE_CLASSES: tuple[str, ...] = SIZES
_HEADS = (("shape", SHAPE_CLASSES), ("colour", COLOUR_CLASSES), ("pattern", PATTERN_CLASSES), ("size", SIZE_CLASSES))
_PER_SLOT = sum(len(c) for _, c in _HEADS)


def _block(cin, cout):
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, padding=1),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
        nn.Conv2d(cout, cout, 3, padding=1),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
    )


class JudgeNet(nn.Module):
    def __init__(self, width: int = 32):
        super().__init__()
        w = width
        self.features = nn.Sequential(
            _block(3, w),
            nn.MaxPool2d(2),  # 16
            _block(w, 2 * w),
            nn.MaxPool2d(2),  # 8
            _block(2 * w, 4 * w),
            nn.MaxPool2d(2),  # 4
        )
        self.fc = nn.Sequential(nn.Flatten(), nn.Linear(4 * w * 16, 256), nn.ReLU(inplace=True), nn.Dropout(0.1))
        self.bg = nn.Linear(256, len(BG_CLASSES))
        self.slots = nn.Linear(256, len(SLOTS) * _PER_SLOT)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        h = self.fc(self.features(x * 2 - 1))
        out = {"background": self.bg(h)}
        s = self.slots(h).view(x.shape[0], len(SLOTS), _PER_SLOT)
        i = 0
        for name, classes in _HEADS:
            out[name] = s[:, :, i : i + len(classes)]  # (N, slots, classes)
            i += len(classes)
        return out


def prepare(images) -> torch.Tensor:
    """Any supported image batch -> float (N,3,32,32) in [0,1]."""
    if isinstance(images, np.ndarray) or not torch.is_tensor(images):
        a = np.asarray(images)
        if a.ndim == 3:
            a = a[None]
        if a.dtype == np.uint8:
            x = torch.from_numpy(a.copy()).permute(0, 3, 1, 2).float() / 255.0
        else:
            x = torch.from_numpy(a.astype(np.float32))
            if x.shape[-1] == 3 and x.shape[1] != 3:
                x = x.permute(0, 3, 1, 2)
    else:
        x = images.detach().float().cpu()
        if x.ndim == 3:
            x = x[None]
    if x.shape[-2:] != (32, 32):
        x = F.interpolate(x, size=(32, 32), mode="area")
    return x.clamp(0, 1)


_CACHE: dict[str, JudgeNet] = {}


def load_judge(path: str | Path = JUDGE_PATH) -> JudgeNet:
    from safetensors.torch import load_file

    key = str(Path(path).resolve())
    if key not in _CACHE:
        m = JudgeNet()
        m.load_state_dict(load_file(str(path)))
        m.eval()
        _CACHE[key] = m
    return _CACHE[key]


@torch.no_grad()
def judge_logits(images, model: JudgeNet | None = None, batch_size: int = 256) -> dict[str, torch.Tensor]:
    model = model or load_judge()
    was = model.training
    model.eval()
    x = prepare(images)
    outs = [model(x[i : i + batch_size]) for i in range(0, len(x), batch_size)]
    model.train(was)
    return {k: torch.cat([o[k] for o in outs]) for k in outs[0]}


def judge(images, model: JudgeNet | None = None) -> list[dict]:
    """Read every image: background and the objects found in each slot."""
    lg = judge_logits(images, model)
    bg = lg["background"].argmax(-1)
    sp = lg["shape"].softmax(-1)
    res = []
    for n in range(len(bg)):
        objs = []
        for k, pos in enumerate(SLOTS):
            cls = int(sp[n, k].argmax())
            if cls == 0:
                continue
            objs.append(
                {
                    "position": pos,
                    "shape": SHAPE_CLASSES[cls],
                    "colour": COLOUR_CLASSES[int(lg["colour"][n, k].argmax())],
                    "pattern": PATTERN_CLASSES[int(lg["pattern"][n, k].argmax())],
                    "size": SIZE_CLASSES[int(lg["size"][n, k].argmax())],
                    "p": float(sp[n, k, cls]),
                }
            )
        res.append({"background": BG_CLASSES[int(bg[n])], "objects": objs})
    return res


def scene_targets(scenes: Sequence[Scene]) -> dict[str, torch.Tensor]:
    """Class-index targets for training / scoring (-100 = absent object)."""
    n = len(scenes)
    t = {
        "background": torch.tensor([BG_CLASSES.index(s.background) for s in scenes]),
        "shape": torch.zeros(n, len(SLOTS), dtype=torch.long),
        "colour": torch.full((n, len(SLOTS)), -100, dtype=torch.long),
        "pattern": torch.full((n, len(SLOTS)), -100, dtype=torch.long),
        "size": torch.full((n, len(SLOTS)), -100, dtype=torch.long),
    }
    for i, s in enumerate(scenes):
        for o in s.objects:
            k = SLOTS.index(o.position)
            t["shape"][i, k] = SHAPE_CLASSES.index(o.shape)
            t["colour"][i, k] = COLOUR_CLASSES.index(o.colour)
            t["pattern"][i, k] = PATTERN_CLASSES.index(o.pattern)
            t["size"][i, k] = SIZE_CLASSES.index(o.size)
    return t


def attribute_accuracy(scenes: Sequence[Scene], images, model: JudgeNet | None = None) -> dict[str, float]:
    """Per-attribute accuracy of the judge on rendered ``scenes``: background (per image),
    slots (shape-or-none over all 5 slots), and shape / colour / pattern / size over the
    objects actually present; ``all`` = fraction of images read entirely right."""
    lg = judge_logits(images, model)
    t = scene_targets(scenes)
    present = t["colour"] != -100
    acc = {
        "background": (lg["background"].argmax(-1) == t["background"]).float().mean().item(),
        "slots": (lg["shape"].argmax(-1) == t["shape"]).float().mean().item(),
    }
    ok_img = (lg["background"].argmax(-1) == t["background"]) & (lg["shape"].argmax(-1) == t["shape"]).all(-1)
    for name in ("shape", "colour", "pattern", "size"):
        pred = lg[name].argmax(-1)
        acc[name] = (pred == t[name])[present].float().mean().item()
        ok_img &= ((pred == t[name]) | ~present).all(-1)
    acc["all"] = ok_img.float().mean().item()
    return acc
