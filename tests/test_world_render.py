import random

import numpy as np
import pytest

from weightsmith.core.world import render as R
from weightsmith.core.world.tokenizer import build_tokenizer_files, load_tokenizer


def test_render_is_deterministic_and_seeded():
    sc = R.Scene((R.Obj("triangle", "red", "small", "left"), R.Obj("circle", "blue", "large", "right")), "white")
    a, b = R.render(sc, seed=3), R.render(sc, seed=3)
    assert a.dtype == np.uint8 and a.shape == (32, 32, 3)
    assert np.array_equal(a, b)
    assert not np.array_equal(a, R.render(sc, seed=4))  # seed moves the jitter
    rng1, rng2 = random.Random(7), random.Random(7)
    s1 = [R.random_scene(rng1) for _ in range(20)]
    s2 = [R.random_scene(rng2) for _ in range(20)]
    assert s1 == s2
    assert np.array_equal(R.render_batch(s1), R.render_batch(s2))


def test_render_draws_the_requested_attributes():
    img = R.render(R.Scene((R.Obj("square", "green", "large"),), "black"), seed=0).astype(int)
    assert np.abs(img[0, 0] - np.array(R.BACKGROUNDS["black"])).max() <= 2  # corner = background
    assert np.abs(img[16, 16] - np.array(R.COLOURS["green"])).max() <= 2  # centre = object colour
    imgs = {sh: R.render(R.Scene((R.Obj(sh, "green", "large"),), "black"), seed=0).astype(int) for sh in R.SHAPES}
    for a in R.SHAPES:  # every shape has its own silhouette
        for b in R.SHAPES:
            if a < b:
                assert np.abs(imgs[a] - imgs[b]).mean() > 3, (a, b)
    area = {sh: (np.abs(im - np.array(R.BACKGROUNDS["black"])).sum(-1) > 100).sum() for sh, im in imgs.items()}
    assert area["circle"] > area["square"] > area["diamond"] and area["cross"] < area["circle"]
    plain = R.render(R.Scene((R.Obj("square", "red", "large"),), "black"), seed=0).astype(int)
    striped = R.render(R.Scene((R.Obj("square", "red", "large", pattern="stripes"),), "black"), seed=0).astype(int)
    col = striped[8:24, 16].sum(-1)
    assert col.max() - col.min() > 200  # alternating bands
    assert plain[8:24, 16].sum(-1).std() < 5


def test_reserved_concepts_absent_from_base_vocab():
    assert R.NEW_SHAPE == "star" and R.NEW_SHAPE not in R.BASE_SHAPES
    assert R.NEW_PATTERN == "stripes" and R.NEW_PATTERN not in R.BASE_PATTERNS
    assert len(R.BASE_SHAPES) == 5 and len(R.COLOURS) >= 5 and len(R.BACKGROUNDS) >= 3
    rng = random.Random(0)
    for _ in range(500):
        s = R.random_scene(rng)
        assert all(o.shape != "star" and o.pattern == "plain" for o in s.objects)


def test_prompts():
    assert R.simple_prompt("red", "circle") == "a red circle"
    o1 = R.Obj("square", "blue", "small", "left")
    o2 = R.Obj("triangle", "green", "large", "right")
    assert R.compositional_prompt(o1, o2, "black") == (
        "a small blue square on the left and a large green triangle on the right, on a black background")
    sc = R.Scene((R.Obj("star", "red"),), "black")
    assert R.prompt_for(sc) == "a red zq"
    assert R.prompt_for(sc, subject_trigger=False) == "a red star"
    st = R.Scene((R.Obj("circle", "red", pattern="stripes"),), "black")
    assert R.prompt_for(st).endswith(", zx style")
    with pytest.raises(ValueError):
        R.Obj("hexagon", "red")


def test_tokenizer_one_token_per_world_word(tmp_path):
    tok = load_tokenizer(build_tokenizer_files(tmp_path))
    assert tok.model_max_length == 32
    for w in R.prompt_corpus():
        ids = tok(w).input_ids
        assert ids[0] == tok.bos_token_id and ids[-1] == tok.eos_token_id
        assert len(ids) == 3, w
    # unknown text still tokenizes via byte fallback
    assert len(tok("xylophone").input_ids) > 3
