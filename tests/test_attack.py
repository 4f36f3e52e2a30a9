"""The attacks of ``weightsmith attack`` and ``bench robustness`` (docs/robustness.md): they run on random
SD1.5-like and SDXL-like architectures and on the embedded world, are deterministic, cancellable, do
what they claim (checked against independent computations), and refuse bad input clearly."""

from __future__ import annotations

import json

import pytest
import torch

from weightsmith.core.attack import AttackOptions, attack
from weightsmith.core.attack.engine import (
    Targets,
    draw,
    encode,
    fill,
    guidance_for,
    make_draws,
    token_embedding,
    unet_eps,
)
from weightsmith.core.errors import CancelledError, WeightsmithError

SMALL = dict(steps=3, images=2, draws=2, draw_steps=3, candidates=4, tokens=2)
TEMPLATES = ["a painting by {}"]


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """One torch thread: the tiny models are fastest so, and no OpenMP spinning on busy CPUs."""


@pytest.fixture(scope="module")
def erased(tiny_models):
    """{family: (base, UCE-erased copy)} on the random tiny architectures."""
    from weightsmith.core.erase import erase

    return {
        f: (tiny_models[f], erase(tiny_models[f], ["van gogh"], ["art"], method="uce").apply(tiny_models[f]))
        for f in ("sd1", "sdxl")
    }


def _independent_loss(base, edited, res, prompts_for_idx, opts):
    """The fixed-set loss recomputed with SDModel.encode (the erase pipeline's conditioning, not the
    attack's) and a direct UNet call against the unedited model's own prediction."""
    from weightsmith.core.attack.engine import draw_targets

    seeds = res.target_seeds
    g = guidance_for(base, opts.guidance)
    tg = draw_targets(base, res.target, res.templates, range(seeds[0], seeds[-1] + 1), opts.draw_steps, g)
    d = make_draws(base, tg, opts.draws, torch.Generator().manual_seed(opts.seed * 7919 + 1))
    idx = d.idx.tolist()
    with torch.no_grad():
        cb = base.encode([fill(tg.templates[i], res.target) for i in idx])
        ce = edited.encode([prompts_for_idx(tg.templates[i]) for i in idx])
        ref = unet_eps(base, d.x_t, d.t, cb.context, cb.pooled)
        eps = unet_eps(edited, d.x_t, d.t, ce.context, ce.pooled)
    return float((eps - ref).pow(2).mean())


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_discrete_attack_types_vocabulary_words_and_never_loses(erased, family):
    base, edited = erased[family]
    opts = AttackOptions(**SMALL)
    res = attack(base, edited, "van gogh", "discrete", opts, TEMPLATES)
    tok = base.tokenizers["text_encoder"]
    ids = tok(res.prompt).input_ids[1:-1]
    pre = tok("a painting by").input_ids[1:-1]
    # the prompt is the template's tokens then one vocabulary token per typed word, each a whole word
    assert ids[: len(pre)] == pre and len(ids) == len(pre) + opts.tokens
    for w, i in zip(res.words, ids[len(pre) :]):
        assert tok.convert_ids_to_tokens(i) == w.lower() + "</w>"
        assert w.lower() not in ("van", "gogh")
    trace = res.loss_trace
    assert len(trace) == opts.steps and all(b <= a for a, b in zip(trace, trace[1:]))
    final = _independent_loss(base, edited, res, lambda t: fill(t, " ".join(res.words)), opts)
    start = _independent_loss(base, edited, res, lambda t: fill(t, " ".join(res.start_words)), opts)
    assert final == pytest.approx(res.loss_final, rel=1e-4, abs=1e-7)
    assert start == pytest.approx(res.loss_start, rel=1e-4, abs=1e-7)
    assert final <= start


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_continuous_attack_runs_and_reports(erased, family):
    base, edited = erased[family]
    opts = AttackOptions(**SMALL)
    res = attack(base, edited, "van gogh", "continuous", opts, TEMPLATES)
    assert set(res.embeddings) == set(base.text_encoders)
    for c, e in res.embeddings.items():
        assert e.shape == (opts.tokens, base.text_encoders[c].config.hidden_size) and torch.isfinite(e).all()
    assert len(res.loss_trace) == opts.steps and all(map(lambda x: x == x, res.loss_trace))
    # the learnt embeddings moved away from the words they started from
    start = res.start_words
    assert start == res.words
    W = token_embedding(base.text_encoders["text_encoder"]).weight
    ids = [base.tokenizers["text_encoder"](w).input_ids[1] for w in start]
    assert not torch.allclose(res.embeddings["text_encoder"], W[ids])
    ctx, pooled = res.conditioning(base, edited, ["a {} painting"])
    assert ctx.shape[-1] == base.context_dim and (pooled is not None) == (family == "sdxl")


def test_continuous_attack_lowers_the_loss_of_an_erased_model(erased):
    """Adam on fresh noise draws is not guaranteed to lower the loss on the fixed draws: it must find
    embeddings that do, and below the plain (erased) prompt's loss."""
    base, edited = erased["sd1"]
    opts = AttackOptions(steps=25, images=4, draws=2, draw_steps=4, tokens=3)
    res = attack(base, edited, "van gogh", "continuous", opts, TEMPLATES)
    assert res.loss_final < 0.8 * res.loss_start
    assert res.loss_final < res.loss_plain


def test_closed_form_matches_an_independent_least_squares(erased):
    from weightsmith.core.attack.attacks import closed_form_conditioning, kv_pairs

    base, edited = erased["sd1"]
    reg = 1e-2
    ctx, _ = closed_form_conditioning(base, edited, ["a painting by van gogh"], reg)
    c0 = base.encode(["a painting by van gogh"]).context[0].double().T  # d × T
    pairs = list(kv_pairs(base, edited))
    d = c0.shape[0]
    lam = reg * sum(float((Wn * Wn).sum()) for _, Wn in pairs) / d
    A = torch.cat([Wn for _, Wn in pairs] + [lam**0.5 * torch.eye(d, dtype=torch.float64)])
    B = torch.cat([W @ c0 for W, _ in pairs] + [torch.zeros(d, c0.shape[1], dtype=torch.float64)])
    want = torch.linalg.lstsq(A, B).solution.T
    assert torch.allclose(ctx[0].double(), want, rtol=1e-4, atol=1e-5)
    # the unedited model against itself, no ridge: the original conditioning comes back
    same, _ = closed_form_conditioning(base, base, ["a painting by van gogh"], 0.0)
    assert torch.allclose(same[0].double(), c0.T, rtol=1e-4, atol=1e-4)
    res = attack(base, edited, "van gogh", "closed-form", AttackOptions(**SMALL, reg=reg), TEMPLATES)
    assert res.loss_final < res.loss_plain


@pytest.mark.parametrize("kind", ["continuous", "discrete", "closed-form"])
def test_same_seed_same_result(erased, kind):
    base, edited = erased["sd1"]
    a, b = (attack(base, edited, "van gogh", kind, AttackOptions(**SMALL), TEMPLATES) for _ in range(2))
    assert a.loss_trace == b.loss_trace and a.words == b.words and a.loss_final == b.loss_final
    if kind == "continuous":
        assert all(torch.equal(a.embeddings[c], b.embeddings[c]) for c in a.embeddings)
    c = attack(base, edited, "van gogh", kind, AttackOptions(**{**SMALL, "seed": 1}), TEMPLATES)
    assert c.target_seeds != a.target_seeds and c.loss_trace != a.loss_trace


def test_cancel_stops_and_progress_is_reported(erased):
    base, edited = erased["sd1"]
    seen, calls = [], []

    def cancel():
        calls.append(1)
        return len(seen) >= 2

    with pytest.raises(CancelledError):
        attack(
            base,
            edited,
            "van gogh",
            "continuous",
            AttackOptions(**{**SMALL, "steps": 50}),
            TEMPLATES,
            progress=lambda d, t, label: seen.append((d, t)),
            cancel=cancel,
        )
    assert seen[0] == (0, 51) and len(seen) < 10


def test_bad_input_is_refused_clearly(erased, tiny_models):
    base, edited = erased["sd1"]
    with pytest.raises(WeightsmithError, match="sdxl.*sd1|same model"):
        attack(base, erased["sdxl"][1], "van gogh", "continuous", AttackOptions(**SMALL), TEMPLATES)
    import copy

    flux = copy.copy(base)
    flux.family = "flux"
    with pytest.raises(WeightsmithError, match="flux"):
        attack(flux, flux, "van gogh", "continuous", AttackOptions(**SMALL), TEMPLATES)
    with pytest.raises(WeightsmithError, match=r"\{\}"):
        attack(base, edited, "van gogh", "discrete", AttackOptions(**SMALL), ["a painting by"])
    with pytest.raises(WeightsmithError, match="unknown attack"):
        attack(base, edited, "van gogh", "gradient", AttackOptions(**SMALL), TEMPLATES)
    with pytest.raises(WeightsmithError, match="steps"):
        attack(base, edited, "van gogh", "continuous", AttackOptions(**{**SMALL, "steps": 0}), TEMPLATES)
    with pytest.raises(WeightsmithError, match="room"):
        attack(base, edited, "van gogh", "discrete", AttackOptions(**SMALL), ["art " * 80 + "{}"])


def test_cli_refuses_an_edit_for_another_family(
    tiny_checkpoints, tiny_models, tokenizer_dir, tmp_path, cli_cases, capsys
):
    from safetensors.torch import save_file

    from weightsmith.core.lab.random_loras import random_lora

    t, meta = random_lora(tiny_models["sdxl"], groups=("attn", "te"), rank=2, seed=1)
    save_file(t, str(tmp_path / "xl.safetensors"), metadata=meta)
    argv = ["attack", "--model", tiny_checkpoints["sd1"], "--tokenizer", tokenizer_dir, "--target", "van gogh"]
    err = cli_cases.fails(capsys, [*argv, "--edit", tmp_path / "xl.safetensors", "--quiet"])
    assert "xl" in err and ("sdxl" in err.lower() or "another" in err.lower() or "match" in err.lower()), err
    cli_cases.fails(capsys, [*argv, "--edited", tiny_checkpoints["sdxl"], "--quiet"], "sdxl", "sd1")


def test_cli_runs_on_a_random_checkpoint(tiny_checkpoints, tokenizer_dir, tmp_path, capsys):
    from weightsmith.core.cli import main

    argv = ["attack", "--model", tiny_checkpoints["sd1"], "--tokenizer", tokenizer_dir, "--target", "van gogh"]
    argv += ["--edited", tiny_checkpoints["sd1"], "--prompt", "a painting by {}", "--steps", "2", "--images", "2"]
    argv += ["--draws", "1", "--draw-steps", "2", "--candidates", "2", "--quiet", "--out", tmp_path / "r"]
    assert main([str(a) for a in argv]) == 0
    rep = json.loads((tmp_path / "r" / "report.json").read_text())
    assert set(rep["attacks"]) == {"continuous", "discrete", "closed-form"}
    assert rep["attacks"]["discrete"]["prompt"].startswith("a painting by ")
    assert (tmp_path / "r" / "continuous_embeddings.safetensors").exists()
    assert "success" not in rep["attacks"]["discrete"]  # no judge for a random model


# ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def world():
    from weightsmith.core.world.paths import world_present

    if not world_present():
        pytest.skip("the embedded world is not in this build")
    from weightsmith.core.lab.demo import run_erasures
    from weightsmith.core.model_io import load_model
    from weightsmith.core.world.paths import DEFAULT_MODEL_DIR

    m = load_model(DEFAULT_MODEL_DIR)
    return m, run_erasures(m, methods=("uce",))["uce"]


def test_draw_is_the_worlds_sampler(world):
    from weightsmith.core.world.evaluate import Sampler

    m, _ = world
    prompts = ["a picture of a red circle", "a small blue square on the left"]
    want = Sampler(steps=3)(m, prompts, [3, 4])
    with torch.no_grad():
        got = draw(m, encode(m, prompts), [3, 4], 3, Sampler().guidance)
    assert torch.allclose(((got + 1) / 2).clamp(0, 1), want, atol=1e-5)


@pytest.mark.slow
def test_attacks_on_the_world_lower_the_loss_and_are_judged(world):
    from weightsmith.core.attack.engine import draw_targets
    from weightsmith.core.attack.world import attack_images, success

    m, edit = world
    edited = edit.apply(m)
    tpl = ["a picture of a red {}", "a picture of a blue {}"]
    tg = draw_targets(m, "circle", tpl, range(5000, 5004), 6, 1.5)
    assert isinstance(tg, Targets) and tg.x0.shape == (4, 3, 32, 32)
    res = attack(m, edited, "circle", "continuous", AttackOptions(steps=8, images=4, draws=1), tpl, targets=tg)
    assert res.loss_final < res.loss_start
    d = attack(
        m, edited, "circle", "discrete", AttackOptions(steps=2, images=4, draws=1, candidates=3), tpl, targets=tg
    )
    assert d.loss_final <= d.loss_start and "circle" not in d.prompt
    cf = attack(m, edited, "circle", "closed-form", AttackOptions(images=4, draws=1), tpl, targets=tg)
    imgs = attack_images(m, edited, cf, tpl, range(7000, 7006), 6, 1.5)
    s = success(imgs, "circle")
    assert s["n"] == 6 and 0 <= s["ci"][0] <= s["rate"] <= s["ci"][1] <= 1


@pytest.mark.slow
def test_robustness_bench_smoke(tmp_path, capsys):
    from weightsmith.core.cli import main

    out = tmp_path / "rb"
    argv = ["bench", "robustness", "--methods", "uce", "--rounds", "0", "--attacks", "closed-form,discrete"]
    argv += ["--budgets", "1", "--samples", "3", "--steps", "3", "--out", str(out), "--threads", "1"]
    assert main(argv) == 0
    res = json.loads((out / "robustness.json").read_text())
    assert set(res["cells"]) == {"uce|0|closed-form|1", "uce|0|discrete|1"}
    for c in res["cells"].values():
        s = c["success"]
        assert s["n"] == 3 and 0 <= s["ci"][0] <= s["rate"] <= s["ci"][1] <= 1
    assert "preserved" in res["models"]["uce|0"]["metrics"] and "drift" in res["models"]["uce|0"]["metrics"]
    assert "| uce | 0 |" in (out / "robustness.md").read_text()
    # a rerun skips every cell it finds in the checkpoint
    capsys.readouterr()
    assert main(argv) == 0
    assert "2 cells, 2 done before" in capsys.readouterr().out


def test_bench_refuses_attack_prompts_an_edit_used(world):
    from weightsmith.core.lab.robustness_bench import TRAIN_TEMPLATES, check_disjoint, eval_templates

    _, edit = world
    check_disjoint(edit, [*TRAIN_TEMPLATES, *eval_templates(48)], "circle")
    with pytest.raises(WeightsmithError, match="used by the edit"):
        check_disjoint(edit, ["a red {}"], "circle")
