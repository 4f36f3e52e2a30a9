"""IterIS and RegMean on Flux.1 (docs/flux_lora.md, "IterIS on Flux"): the streaming solver equals its
brute-force definition on a tiny random Flux, computed here independently (diffusers' own transformer with
the deltas added to its weights, diffusers' FluxPipeline packing and flow-matching scheduler, stored
features); a one-LoRA merge returns that LoRA; the transformer Weightsmith runs equals diffusers' in every
layout, streamed or held."""

import copy

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

pytest.importorskip("diffusers.models.transformers.transformer_flux")

from test_iteris_streaming import STEPS, _solve  # the SD brute force's solve: the definition, family-free
from test_iteris_streaming import _options as _sd_options

from weightsmith.core.errors import WeightsmithError
from weightsmith.core.merge import merge

LATENT = 4
PROMPTS = [["a red cat on a tree", "a dog at night"], ["a blue car in the city"]]
SEEDS = [5, 6]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    from weightsmith.core.flux_io import load_flux
    from weightsmith.core.lab.random_models import build_random_flux, write_random_flux

    rf = build_random_flux(3)
    root = tmp_path_factory.mktemp("fluxiteris")
    path, tes = write_random_flux(rf, root / "bfl", "bfl")
    shapes = {n: tuple(m.weight.shape) for n, m in rf.transformer.named_modules() if isinstance(m, torch.nn.Linear)}
    g = torch.Generator().manual_seed(11)

    def pair(out, inn, r):
        return torch.randn(out, r, generator=g) * 0.3, torch.randn(r, inn, generator=g) * 0.3

    # A, kohya: the fused image qkv (three pieces sharing one input), the text MLP, a single block's
    # fused linear1 and its 5H-wide linear2, txt_in, the image modulation
    a = {}
    for bfl, r in (
        ("double_blocks.0.img_attn.qkv", 2),
        ("double_blocks.0.txt_mlp.2", 3),
        ("single_blocks.0.linear1", 2),
        ("single_blocks.0.linear2", 3),
        ("txt_in", 2),
        ("double_blocks.0.img_mod.lin", 1),
    ):
        from weightsmith.core.layouts.flux_names import bfl_to_diffusers

        pieces = bfl_to_diffusers(bfl, 32)
        rows = sum(shapes[p.diffusers][0] for p in pieces)
        up, down = pair(rows, shapes[pieces[0].diffusers][1], r)
        pre = "lora_unet_" + bfl.replace(".", "_")
        a[pre + ".lora_up.weight"], a[pre + ".lora_down.weight"], a[pre + ".alpha"] = up, down, torch.tensor(float(r))
    # B, diffusers/PEFT: pieces of the same layers (to_k, proj_mlp), one A does not touch (norm_out, swapped
    # halves), and the text stream's add_v_proj
    b = {}
    for n, r in (
        ("transformer_blocks.0.attn.to_k", 2),
        ("single_transformer_blocks.0.proj_mlp", 2),
        ("norm_out.linear", 1),
        ("transformer_blocks.0.attn.add_v_proj", 2),
        ("single_transformer_blocks.0.proj_out", 2),
    ):
        up, down = pair(shapes[n][0], shapes[n][1], r)
        b[f"transformer.{n}.lora_A.weight"], b[f"transformer.{n}.lora_B.weight"] = down, up
    save_file({k: v.contiguous() for k, v in a.items()}, str(root / "a_kohya.safetensors"))
    save_file({k: v.contiguous() for k, v in b.items()}, str(root / "b_peft.safetensors"))
    model = load_flux(path, tes)
    return {
        "rf": rf,
        "model": model,
        "loras": [root / "a_kohya.safetensors", root / "b_peft.safetensors"],
        "root": root,
    }


def _options(**more):
    """The SD brute-force test's settings (one iteration, two samples, seed 5) at this file's latent size."""
    return _sd_options(**{"latent_size": LATENT, **more})


def _float64(model):
    m = copy.copy(model)
    m.sample_dtype = torch.float64
    return m


def _with_deltas(transformer, deltas: dict):
    """diffusers' transformer in float64 with ΔW added to its weights (canonical names)."""
    t = copy.deepcopy(transformer).double()
    with torch.no_grad():
        for n, d in deltas.items():
            mod = t.get_submodule(n.removeprefix("transformer."))
            mod.weight += d.double().reshape(mod.weight.shape)
    return t


@torch.no_grad()
def _features(transformers, names, model, prompts, seeds):
    """Inputs of every module, paired: the first transformer drives the trajectory (diffusers' FluxPipeline
    packing and its flow-matching Euler scheduler, shifted with μ = 1.15, dev guidance 3.5)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline

    feats = [{n: [] for n in names} for _ in transformers]
    handles = []
    for k, tr in enumerate(transformers):
        for n in names:
            mod = tr.get_submodule(n.removeprefix("transformer."))
            handles.append(
                mod.register_forward_hook(
                    lambda m, inp, out, k=k, n=n: feats[k][n].append(inp[0].reshape(-1, inp[0].shape[-1]).double())
                )
            )
    cfg = transformers[0].config
    ch = cfg.in_channels // 4
    try:
        for p, seed in zip(prompts, seeds):
            ctx = model.t5_hidden([p]).double()
            pooled = model.clip_pooled([p]).double()
            sched = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, time_shift_type="exponential")
            sched.set_timesteps(sigmas=np.linspace(1.0, 1.0 / STEPS, STEPS), mu=1.15)
            z = torch.randn((ch, LATENT, LATENT), generator=torch.Generator().manual_seed(seed))[None].double()
            x = FluxPipeline._pack_latents(z, 1, ch, LATENT, LATENT)
            img_ids = FluxPipeline._prepare_latent_image_ids(1, LATENT // 2, LATENT // 2, "cpu", torch.float64)
            txt_ids = torch.zeros(ctx.shape[1], 3, dtype=torch.float64)
            for t in sched.timesteps:
                outs = [
                    tr(
                        hidden_states=x,
                        encoder_hidden_states=ctx,
                        pooled_projections=pooled,
                        timestep=(t / 1000).reshape(1).double(),
                        img_ids=img_ids,
                        txt_ids=txt_ids,
                        guidance=torch.full((1,), 3.5, dtype=torch.float64),
                        return_dict=False,
                    )[0]
                    for tr in transformers
                ]
                x = sched.step(outs[0], t, x, return_dict=False)[0]
    finally:
        for h in handles:
            h.remove()
    return [{n: torch.cat(v) for n, v in f.items()} for f in feats]


def test_flux_iteris_equals_its_brute_force_definition(world):
    from weightsmith.core.lora_read import load_lora

    model = _float64(world["model"])
    edit = merge(model, world["loras"], "iteris", prompts=PROMPTS, options=_options())
    assert edit.report["iterations"] == 1 and edit.report["family"] == "flux"
    assert not edit.report["fallback_weighted_sum"]

    loras = [load_lora(p, world["model"]) for p in world["loras"]]
    names = sorted(set(loras[0].modules) | set(loras[1].modules))
    assert {"transformer.transformer_blocks.0.attn.to_q", "transformer.single_transformer_blocks.0.proj_out"} <= set(
        names
    )
    base = world["rf"].transformer
    lora_trs = [_with_deltas(base, l.deltas(torch.float64)) for l in loras]
    per_sample = [[p[k % len(p)] for k in range(2)] for p in PROMPTS]
    X = [_features([lt], names, world["model"], per_sample[i], SEEDS)[0] for i, lt in enumerate(lora_trs)]
    lam = []
    for i, l in enumerate(loras):
        lam.append({})
        for n in names:
            W = model.weight(n).double()
            if n in l.modules:
                W = W + l.modules[n].delta(torch.float64).reshape(W.shape)
            lam[i][n] = float(W.norm() ** 2 / (X[i][n] @ W.t()).norm() ** 2)
    stats0 = [{n: (X[i][n].t() @ X[i][n], X[i][n].t() @ X[i][n]) for n in names} for i in range(2)]
    dw0 = _solve(model, loras, names, stats0, lam, "skip", "sum")
    merged0 = _with_deltas(base, dw0)
    stats1 = []
    for i, lt in enumerate(lora_trs):
        Xi, Xt = _features([lt, merged0], names, world["model"], per_sample[i], SEEDS)
        torch.testing.assert_close(Xi[names[0]], X[i][names[0]])  # the same samples, the same rows
        stats1.append({n: (Xi[n].t() @ Xt[n], Xt[n].t() @ Xt[n]) for n in names})
    dw1 = _solve(model, loras, names, stats1, lam, "skip", "sum")
    for n in names:
        rel = float((edit.deltas[n].double() - dw1[n]).norm() / dw1[n].norm())
        assert rel <= 1e-6, (n, rel)
        for i in range(2):
            if n in loras[i].modules:
                # the two schedules hold t in float32 (diffusers' as sigma·1000), which differ in the last bits
                got = edit.report["lambdas"][n][i]
                assert abs(got - lam[i][n]) <= 1e-7 * lam[i][n], (n, i)
    # the iteration changed the merge (else X̃ would have had no effect and the test would be vacuous)
    assert max(float((dw1[n] - dw0[n]).norm() / dw1[n].norm()) for n in names) > 1e-3


def test_a_one_lora_merge_returns_that_lora(world):
    from weightsmith.core.lora_read import load_lora

    lora = load_lora(world["loras"][0], world["model"])
    edit = merge(_float64(world["model"]), [world["loras"][0]], "iteris", prompts=PROMPTS[0], options=_options())
    for n, m in lora.modules.items():
        d = m.delta(torch.float64)
        assert float((edit.deltas[n].double() - d).norm() / d.norm()) <= 1e-6, n


def test_regmean_on_flux_is_iteris_iteration_zero_without_ridge(world):
    """RegMean = IterIS's iteration 0 with no ridge (docs/method.md): the same solve, on Flux too."""
    reg = merge(_float64(world["model"]), world["loras"], "regmean", prompts=PROMPTS, options=_options())
    it0 = merge(
        _float64(world["model"]),
        world["loras"],
        "iteris",
        prompts=PROMPTS,
        options=_options(iterations=0, alpha1=0.0, alpha2=0.0, adaptive_lambda=False),
    )
    assert reg.report["method"] == "regmean" and reg.report["iterations"] == 0
    for n in reg.deltas:
        torch.testing.assert_close(reg.deltas[n], it0.deltas[n], rtol=1e-5, atol=1e-7)


def test_the_exported_iteris_lora_is_the_merge(world, tmp_path):
    """IterIS's factors are exact (rank Σr): the written LoRA reads back as the merge it reports."""
    from weightsmith.core.lora_read import load_lora
    from weightsmith.core.merge.api import save_merge

    edit = merge(world["model"], world["loras"], "iteris", prompts=PROMPTS, options=_options(iterations=2))
    assert len(edit.report["curve"]) == 3
    out = tmp_path / "merged.safetensors"
    save_merge(edit, world["model"], out)
    back = load_lora(out, world["model"])
    assert set(back.modules) == set(edit.deltas)
    for n, m in back.modules.items():
        d = edit.deltas[n].double()
        assert float((m.delta(torch.float64) - d).norm() / d.norm()) <= 1e-5, n


@pytest.mark.parametrize("layout", ["bfl", "comfy", "diffusers"])
def test_the_transformer_weightsmith_runs_is_diffusers(world, tmp_path, layout):
    """Read from every layout (streamed or held), it predicts what diffusers' own transformer does."""
    from weightsmith.core.flux_io import load_flux
    from weightsmith.core.flux_sampling import build_transformer, predict
    from weightsmith.core.lab.random_models import write_random_flux

    rf = world["rf"]
    path, tes = write_random_flux(rf, tmp_path, layout)
    model = load_flux(path, tes)
    x = torch.randn(2, 1, 4, 6, generator=torch.Generator().manual_seed(0))
    ctx, pooled = model.t5_hidden(["a", "b"]), model.clip_pooled(["a", "b"])
    from diffusers import FluxPipeline

    ref = rf.transformer(
        hidden_states=FluxPipeline._pack_latents(x, 2, 1, 4, 6),
        encoder_hidden_states=ctx,
        pooled_projections=pooled,
        timestep=torch.full((2,), 0.7),
        img_ids=FluxPipeline._prepare_latent_image_ids(2, 2, 3, "cpu", torch.float32),
        txt_ids=torch.zeros(ctx.shape[1], 3),
        guidance=torch.full((2,), 3.5),
        return_dict=False,
    )[0]
    ref = FluxPipeline._unpack_latents(ref, 32, 48, 8)
    for hold in (True, False):
        tr = build_transformer(model, hold=hold)
        assert tr.streamed is (not hold)
        got = predict(None, tr, x, 0.7, ctx, pooled)
        torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-5)
        if not hold:  # between calls the blocks hold no weights
            assert all(p.device.type == "meta" for p in tr.transformer_blocks.parameters())


def test_a_streamed_merge_equals_a_held_one(world, monkeypatch):
    """The merge does not depend on whether the transformer's blocks are held or read per call."""
    from weightsmith.core import flux_sampling

    held = merge(world["model"], world["loras"], "iteris", prompts=PROMPTS, options=_options())
    monkeypatch.setattr(flux_sampling, "HOLD_LIMIT", 0)
    streamed = merge(world["model"], world["loras"], "iteris", prompts=PROMPTS, options=_options())
    for n in held.deltas:
        torch.testing.assert_close(streamed.deltas[n], held.deltas[n], rtol=1e-5, atol=1e-7)


def test_iteris_on_flux_needs_both_text_encoders(world, tmp_path):
    from weightsmith.core.flux_io import load_flux
    from weightsmith.core.lab.random_models import write_random_flux

    path, _ = write_random_flux(world["rf"], tmp_path, "bfl")
    bare = load_flux(path)
    with pytest.raises(WeightsmithError, match="--text-encoder"):
        merge(bare, world["loras"], "iteris", prompts=PROMPTS, options=_options())


def test_t5_encodes_each_prompt_once_when_no_lora_adapts_a_text_encoder(world, monkeypatch):
    """Every pass reads the same conditioning then: T5 runs once per distinct prompt, not once per pass."""
    from weightsmith.core.fluxmodel import T5Encoder

    calls = []
    orig = T5Encoder.encode

    def counted(self, ids, blocks=None):
        calls.append(ids.shape[0])
        return orig(self, ids, blocks)

    monkeypatch.setattr(T5Encoder, "encode", counted)
    edit = merge(world["model"], world["loras"], "iteris", prompts=PROMPTS, options=_options(iterations=2))
    assert len(edit.report["curve"]) == 3 and edit.report["text_encoder_passes"] > 3
    assert sum(calls) == len({p for ps in PROMPTS for p in ps})
