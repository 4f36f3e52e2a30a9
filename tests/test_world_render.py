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
        "a small blue square on the left and a large green triangle on the right, on a black background"
    )
    sc = R.Scene((R.Obj("star", "red"),), "black")
    assert R.prompt_for(sc) == "a red zq"
    assert R.prompt_for(sc, subject_trigger=False) == "a red star"
    st = R.Scene((R.Obj("circle", "red", pattern="stripes"),), "black")
    assert R.prompt_for(st).endswith(", zx style")
    assert R.prompt_for(st, style_phrase="zv style").endswith(", zv style")
    assert R.prompt_for(sc, subject_word="zk") == "a red zk"
    with pytest.raises(ValueError):
        R.Obj("hexagon", "red")


def test_tokenizer_one_token_per_world_word(tmp_path):
    tok = load_tokenizer(build_tokenizer_files(tmp_path))
    assert tok.model_max_length == 32
    assert load_tokenizer(build_tokenizer_files(tmp_path / "v2", R.prompt_corpus("v2"), 77)).model_max_length == 77
    for w in R.prompt_corpus():
        ids = tok(w).input_ids
        assert ids[0] == tok.bos_token_id and ids[-1] == tok.eos_token_id
        assert len(ids) == 3, w
    # unknown text still tokenizes via byte fallback
    assert len(tok("xylophone").input_ids) > 3


def test_v2_template_pool_extends_v1():
    for v1, v2 in zip(R.TEMPLATE_SETS["v1"], R.TEMPLATE_SETS["v2"]):
        assert set(v1) < set(v2)
    sc = R.Scene((R.Obj("circle", "red"),), "gray")
    import random

    seen = {R.prompt_for(sc, random.Random(i), templates="v2") for i in range(200)}
    assert "an image of a red circle" in seen and "an image of a red circle" not in {
        R.prompt_for(sc, random.Random(i)) for i in range(200)
    }


def _skeleton(p: str) -> str:
    """A prompt with its attribute words replaced by placeholders: its template."""
    words = set(R.COLOURS) | set(R.BACKGROUNDS) | set(R.SIZES) | set(R.POSITIONS) | set(R.SHAPES) | {"zq", "zk"}
    out = []
    for w in p.replace(",", " ,").split():
        out.append("_" if w in words else w)
    return " ".join(out)


def test_evaluation_prompts_are_held_out_from_edit_and_merge_prompts():
    """Every evaluation prompt's template differs from every template an edit or a merge is computed from."""
    from weightsmith.core.world import evaluate as E

    edit = {_skeleton(t.format("circle")) for t in E.ERASE_TEMPLATES} | {_skeleton("circle")}
    ev = E.erase_prompt_sets(48)
    evals = ev["simple"] + ev["context"] + [p for p, *_ in ev["two"]] + [p for p, *_ in ev["preserved"]]
    assert not edit & {_skeleton(p) for p in evals}
    for pair in E.PAIRS:
        samples = {_skeleton(p) for ps in E.merge_sample_prompts(8, pair) for p in ps}
        held = {_skeleton(p) for ps in E.merge_prompt_sets(48, pair).values() for p in ps}
        assert samples and held and not samples & held
