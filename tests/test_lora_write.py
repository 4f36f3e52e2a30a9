"""Our written LoRAs load in diffusers with the same effect as our own application."""

import copy

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from weightsmith.core.lab.random_loras import random_lora
from weightsmith.core.lora_read import lora_from_state_dict
from weightsmith.core.merge import merge, save_merge


def _module(pipe, name):
    comp, _, path = name.partition(".")
    root = pipe.unet if comp == "unet" else pipe.text_encoder
    try:
        return root.get_submodule(path)
    except AttributeError:
        return root.get_submodule(path.removeprefix("text_model."))


def test_written_lora_loads_in_diffusers(tiny_models, tmp_path):
    pytest.importorskip("peft", reason="diffusers' load_lora_weights needs peft (pip install peft)")
    model = tiny_models["sd1"]
    loras = [
        lora_from_state_dict(random_lora(model, groups=g, rank=r, seed=s)[0], model, name=f"l{s}")
        for s, g, r in ((1, ("attn", "ff", "te", "conv"), 4), (2, ("attn", "te"), 2))
    ]
    edit = merge(model, loras, "concat", weights=[1.0, 0.5])
    out = tmp_path / "merged.safetensors"
    save_merge(edit, model, out, loras=loras)
    with safe_open(str(out), "pt") as f:
        meta = f.metadata()
        keys = list(f.keys())
    assert meta["ss_base_model_version"] == "sd_v1" and meta["ws_method"] == "concat"
    assert all(k.startswith(("lora_unet_", "lora_te_")) for k in keys)
    assert sum(k.endswith(".alpha") for k in keys) == len(edit.deltas)

    pipe = _family_pipeline(model)
    pipe.load_lora_weights(load_file(str(out)))
    pipe.fuse_lora()
    ours = edit.apply(model)
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    ids = model.tokenize(["a red cat"])
    with torch.no_grad():
        for n in edit.deltas:
            theirs = _module(pipe, n).weight
            delta = ours.module(n).weight - model.module(n).weight
            assert float((theirs - ours.module(n).weight).abs().max()) <= 1e-4 * float(delta.abs().max()), n
        # and the same outputs end to end
        ctx_ours = ours.text_encoders["text_encoder"](ids).last_hidden_state
        ctx_theirs = pipe.text_encoder(ids).last_hidden_state
        torch.testing.assert_close(ctx_theirs, ctx_ours, rtol=1e-4, atol=1e-4)
        e_ours = ours.unet(x, 500, encoder_hidden_states=ctx_ours).sample
        e_theirs = pipe.unet(x, 500, encoder_hidden_states=ctx_ours).sample
        torch.testing.assert_close(e_theirs, e_ours, rtol=1e-4, atol=1e-4)
        base = model.unet(x, 500, encoder_hidden_states=ctx_ours).sample
        assert float((e_ours - base).abs().max()) > 1e-3  # the LoRA does something


def test_fused_open_clip_siblings_are_completed(tiny_models, tmp_path):
    """SD2's OpenCLIP attention is fused in A1111: q, k, v and out must all be in the file."""
    from weightsmith.core.edit import Edit
    from weightsmith.core.lora_read import load_lora
    from weightsmith.core.lora_write import save_lora

    model = tiny_models["sd2"]
    n = "text_encoder.text_model.encoder.layers.1.self_attn.k_proj"
    up, down = torch.randn(model.weight(n).shape[0], 2), torch.randn(2, model.weight(n).shape[1])
    e = Edit("sd2", model.unet_config, {n: up @ down}, {n: (up, down)}, {"method": "test"})
    save_lora(e, tmp_path / "plain.safetensors", complete_fused=False)
    save_lora(e, tmp_path / "full.safetensors", complete_fused=True)
    assert len(load_file(str(tmp_path / "plain.safetensors"))) == 3
    back = load_lora(tmp_path / "full.safetensors", model)
    subs = {k.rsplit(".", 1)[1] for k in back.modules}
    assert subs == {"q_proj", "k_proj", "v_proj", "out_proj"}
    torch.testing.assert_close(back.modules[n].delta(), up @ down, rtol=1e-5, atol=1e-6)
    assert all(float(m.delta().abs().max()) == 0 for k, m in back.modules.items() if k != n)


def test_export_note_tells_float_precision_from_a_rank_cap(tiny_models, tmp_path):
    """A dense ΔW written at its numerical rank loses only singular values under the write tolerance:
    the note says exact to float precision, never "raise Rank" (which cannot help); under a rank cap
    the note gives the truncation error, checked against the SVD's own tail."""
    from weightsmith.core.edit import Edit
    from weightsmith.core.factor import WRITE_RTOL
    from weightsmith.core.lora_write import export_note, save_lora

    model = tiny_models["sd1"]
    n = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k"
    o, i = model.weight(n).shape
    g = torch.Generator().manual_seed(0)
    S = torch.tensor([1.0, 0.5, 0.25, 0.95 * WRITE_RTOL, 0.9 * WRITE_RTOL], dtype=torch.float64)  # rank 3 + 2 tiny
    U = torch.linalg.qr(torch.randn(o, 5, generator=g, dtype=torch.float64))[0]
    V = torch.linalg.qr(torch.randn(i, 5, generator=g, dtype=torch.float64))[0]
    delta = (U * S.double()) @ V.t()
    e = Edit("sd1", model.unet_config, {n: delta}, {}, {"method": "test"})
    full = save_lora(e, tmp_path / "full.safetensors")
    tail = float(S[3:].norm() / S.norm())
    assert full["rank"] == 3 and full["rank_cap"] is None and abs(full["max_error"] - tail) < 1e-8
    note = export_note(full)
    assert note.startswith("exact to float precision") and "Rank" not in note
    capped = save_lora(e, tmp_path / "capped.safetensors", rank=1)
    assert abs(capped["max_error"] - float(S[1:].norm() / S.norm())) < 1e-5
    assert "at rank 1" in export_note(capped) and "raise Rank" in export_note(capped)
    assert export_note({"max_error": 0.0, "rank_cap": 4}) == "exact"
    assert tail > 1e-6


# ----------------------------------------------------------------------------------------------
# every LoRA we write loads exactly in diffusers' load_lora_weights: erase (all methods) and merge,
# SD1 / SD2 / SDXL (issue 12: an erasepro LoRA with text-encoder k/v was refused, and modules of a
# rank other than the file's most common one loaded at the wrong scale)
def _family_pipeline(model):
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline

    vae = AutoencoderKL(
        block_out_channels=(8,),
        down_block_types=("DownEncoderBlock2D",),
        up_block_types=("UpDecoderBlock2D",),
        latent_channels=4,
        norm_num_groups=8,
    )
    te = {c: copy.deepcopy(t) for c, t in model.text_encoders.items()}
    sched = DDIMScheduler(clip_sample=False, steps_offset=1)
    if model.family == "sdxl":
        return StableDiffusionXLPipeline(
            vae=vae,
            text_encoder=te["text_encoder"],
            text_encoder_2=te["text_encoder_2"],
            tokenizer=model.tokenizers["text_encoder"],
            tokenizer_2=model.tokenizers["text_encoder_2"],
            unet=copy.deepcopy(model.unet),
            scheduler=sched,
        )
    return StableDiffusionPipeline(
        vae=vae,
        text_encoder=te["text_encoder"],
        tokenizer=model.tokenizers["text_encoder"],
        unet=copy.deepcopy(model.unet),
        scheduler=sched,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def _diffusers_roots(pipe):
    roots = {"unet": pipe.unet, "text_encoder": pipe.text_encoder}
    if getattr(pipe, "text_encoder_2", None) is not None:
        roots["text_encoder_2"] = pipe.text_encoder_2
    return roots


def _canonical(comp, n):
    if comp != "unet" and not n.startswith(("text_model.", "text_projection")):
        n = "text_model." + n
    return f"{comp}.{n}"


def _diffusers_deltas(pipe):
    """canonical module name -> the ΔW diffusers/PEFT will add (scaling · B @ A, float64), for every
    module that got a LoRA layer."""
    from peft.tuners.lora import LoraLayer

    out = {}
    for comp, root in _diffusers_roots(pipe).items():
        for n, m in root.named_modules():
            if isinstance(m, LoraLayer):
                for a in m.lora_A:
                    A, B = m.lora_A[a].weight.double(), m.lora_B[a].weight.double()
                    d = m.scaling[a] * (B.reshape(B.shape[0], -1) @ A.reshape(A.shape[0], -1))
                    out[_canonical(comp, n)] = d.reshape(m.get_base_layer().weight.shape)
    return out


def _diffusers_weights(pipe):
    out = {}
    for comp, root in _diffusers_roots(pipe).items():
        for n, m in root.named_modules():
            if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)) and ".lora_" not in n:
                out[_canonical(comp, n.replace(".base_layer", ""))] = m.weight.detach().double().clone()
    return out


def assert_loads_exactly_in_diffusers(model, edit, path):
    """After load_lora_weights, diffusers holds a LoRA layer on exactly the edited modules whose
    ΔW = scaling·B@A equals ours (relative error <= 1e-5; zero entries we add for the hosts may be
    there too, and must be zero), and fuse_lora changes each weight by that ΔW and no other weight.
    Returns the largest relative error of the loaded ΔW."""
    pipe = _family_pipeline(model)
    before = _diffusers_weights(pipe)
    pipe.load_lora_weights(load_file(str(path)))
    loaded = _diffusers_deltas(pipe)
    assert set(edit.deltas) <= set(loaded), sorted(set(edit.deltas) - set(loaded))[:3]
    worst = 0.0
    for n, got in loaded.items():
        if n not in edit.deltas:
            assert float(got.abs().max()) == 0.0, n  # a zero sibling (A1111 / diffusers)
            continue
        want = edit.deltas[n].double().reshape(got.shape)
        err = float((got - want).norm() / want.norm())
        assert err <= 1e-5, (n, err)
        worst = max(worst, err)
    pipe.fuse_lora()
    for n, w in _diffusers_weights(pipe).items():
        want = edit.deltas[n].double().reshape(w.shape) if n in edit.deltas else 0.0
        tol = 1e-6 * float(before[n].abs().max()) + 1e-4 * (float(want.abs().max()) if n in edit.deltas else 0.0)
        assert float((w - before[n] - want).abs().max()) <= tol, n
    return worst


@pytest.mark.parametrize("family", ["sd1", "sd2", "sdxl"])
@pytest.mark.parametrize("method", ["erasepro", "zero-residual", "uce"])
def test_erase_lora_loads_exactly_in_diffusers(tiny_models, tmp_path, family, method):
    pytest.importorskip("peft", reason="diffusers' load_lora_weights needs peft (pip install peft)")
    from weightsmith.core.erase.pipeline import EraseOptions, erase
    from weightsmith.core.lora_write import save_lora

    model = tiny_models[family]
    edit = erase(model, ["cat"], ["dog"], method=method, options=EraseOptions(expand_prompts=False))
    assert any(k.startswith("text_encoder") for k in edit.deltas) == (method == "erasepro")
    out = tmp_path / "erase.safetensors"
    save_lora(edit, out)
    alphas = {float(v) for k, v in load_file(str(out)).items() if k.endswith(".alpha")}
    assert len(alphas) == 1  # one alpha convention for the file
    worst = assert_loads_exactly_in_diffusers(model, edit, out)
    print(f"diffusers load {family} {method}: max rel err {worst:.2e}")


@pytest.mark.parametrize("family", ["sd1", "sd2", "sdxl"])
@pytest.mark.parametrize("method", ["concat", "ties"])
def test_merge_lora_loads_exactly_in_diffusers(tiny_models, tmp_path, family, method):
    pytest.importorskip("peft", reason="diffusers' load_lora_weights needs peft (pip install peft)")
    model = tiny_models[family]
    loras = [
        lora_from_state_dict(random_lora(model, groups=g, rank=r, seed=s)[0], model, name=f"l{s}")
        for s, g, r in ((1, ("attn", "ff", "te", "conv"), 4), (2, ("kv", "te"), 2))
    ]
    edit = merge(model, loras, method, weights=[1.0, 0.5])
    out = tmp_path / "merged.safetensors"
    save_merge(edit, model, out, loras=loras)
    worst = assert_loads_exactly_in_diffusers(model, edit, out)
    print(f"diffusers load {family} {method}: max rel err {worst:.2e}")
