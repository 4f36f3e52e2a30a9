import random

import numpy as np
import pytest
import torch

from weightsmith.core.world import render as R
from weightsmith.core.world.judge import attribute_accuracy, judge, load_judge
from weightsmith.core.world.metrics import concept_rate, image_drift
from weightsmith.core.world.paths import JUDGE_PATH

pytestmark = pytest.mark.usefixtures("one_thread")


def _heldout(n, seed):
    rng = random.Random(seed)
    scenes = [R.random_scene(rng, shapes=R.SHAPES, patterns=R.PATTERNS, p_two=0.35, p_placed=0.25) for _ in range(n)]
    return scenes, R.render_batch(scenes, seeds=[rng.randrange(1 << 30) for _ in scenes])


def test_shipped_judge_accuracy_on_fresh_heldout_renders():
    assert JUDGE_PATH.is_file()
    scenes, imgs = _heldout(400, seed=424242)  # a seed stream never used in training
    acc = attribute_accuracy(scenes, imgs, load_judge())
    for k in ("background", "slots", "shape", "colour", "pattern", "size"):
        assert acc[k] >= 0.98, (k, acc)


def test_judge_reads_objects_and_positions():
    sc = R.Scene((R.Obj("star", "red", "small", "left", "stripes"), R.Obj("square", "blue", "large", "right")), "white")
    (r,) = judge(R.render(sc, seed=5))
    assert r["background"] == "white"
    got = {(o["position"], o["shape"], o["colour"], o["pattern"]) for o in r["objects"]}
    assert got == {("left", "star", "red", "stripes"), ("right", "square", "blue", "plain")}
    # float NCHW input in [0,1] is read the same as uint8 HWC
    (r2,) = judge(R.to_tensor(R.render(sc, seed=5)))
    assert r2 == r or [o["shape"] for o in r2["objects"]] == [o["shape"] for o in r["objects"]]


def test_metrics():
    stars = [R.Scene((R.Obj("star", c),), "black") for c in ("red", "green", "blue", "yellow")]
    circles = [R.Scene((R.Obj("circle", c, pattern="stripes"),), "gray") for c in ("red", "green", "blue", "yellow")]
    a, b = R.render_batch(stars), R.render_batch(circles)
    assert concept_rate(a, shape="star") == 1.0
    assert concept_rate(b, shape="star") == 0.0
    assert concept_rate(b, pattern="stripes") == 1.0 and concept_rate(a, pattern="stripes") == 0.0
    assert concept_rate(np.concatenate([a, b]), shape="star", colour="red") == 1 / 8
    assert concept_rate(b, background="gray") == 1.0
    assert image_drift(a, a) == 0.0
    d = image_drift(a, b)
    assert 0.05 < d < 1.0
    assert abs(image_drift(R.to_tensor(a), torch.from_numpy(b).permute(0, 3, 1, 2).float() / 255) - d) < 1e-6
