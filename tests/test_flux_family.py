"""Flux.1 as a registered model family (docs/method.md, "Model families"; docs/flux.md), and
``load_model`` / ``weightsmith merge`` / ``weightsmith erase --format lora`` on Flux inputs."""

from __future__ import annotations

import math

import pytest
import torch
from safetensors import safe_open

from weightsmith.core import families
from weightsmith.core.errors import WeightsmithError
from weightsmith.core.families.flux import FAMILY, FlowSchedule, build_conditioning
from weightsmith.core.flux_io import load_flux
from weightsmith.core.lab.random_models import build_random_flux, write_random_flux
from weightsmith.core.layouts import flux_lora
from weightsmith.core.layouts.flux_names import diffusers_to_bfl

CTX, VEC = "transformer.context_embedder", "transformer.time_text_embed.text_embedder.linear_1"


@pytest.fixture(scope="module")
def rf():
    return build_random_flux(0)


@pytest.fixture(scope="module")
def files(rf, tmp_path_factory):
    root = tmp_path_factory.mktemp("fluxfam")
    return {layout: write_random_flux(rf, root / layout, layout) for layout in ("bfl", "comfy", "diffusers")}


def _keys(path):
    with safe_open(str(path), framework="pt") as f:
        return list(f.keys())


def test_flux_is_registered_after_the_sd_families():
    assert "flux" in families.names() and families.get("flux") is FAMILY
    assert list(families.labels()) == ["sd1", "sd2", "sdxl", "flux"]
    assert families.supported_phrase() == "SD1.x, SD2.x, SDXL and Flux.1"
    assert [c.name for c in FAMILY.components] == ["transformer", "text_encoder", "text_encoder_2"]
    assert FAMILY.denoiser.name == "transformer" and FAMILY.text_encoder_names == ["text_encoder", "text_encoder_2"]
    assert [s.label for s in FAMILY.erase.conditioning_stages] == ["txt_in", "vector_in"]


def test_detection_from_keys_of_each_flux_layout(files):
    assert families.detect_from_keys(_keys(files["bfl"][0])) == "flux"
    assert families.detect_from_keys(_keys(files["comfy"][0])) == "flux"
    d = files["diffusers"][0] / "transformer"
    keys = [k for f in sorted(d.glob("*.safetensors")) for k in _keys(f)]
    assert families.detect_from_keys(keys) == "flux"
    # a text-encoder file alone is no Flux model
    assert not FAMILY.recognise_keys(set(_keys(files["bfl"][1][1])))


def test_conditioning_is_t5_tokens_and_clip_pooled(files):
    m = load_flux(*files["bfl"])
    prompts = ["a cat by van gogh", "a dog"]
    specs = FAMILY.encoder_specs(12, False, None)
    assert specs["text_encoder_2"].tokens and not specs["text_encoder_2"].pooled
    assert specs["text_encoder"].pooled and not specs["text_encoder"].tokens
    t5, pooled = m.t5_hidden(prompts), m.clip_pooled(prompts)
    c = build_conditioning({"text_encoder_2": t5}, {"text_encoder": pooled})
    assert c.context is t5 and c.pooled is pooled
    assert c.context.shape[-1] == m.weight(CTX).shape[1] and c.pooled.shape[-1] == m.weight(VEC).shape[1]
    with pytest.raises(WeightsmithError, match="clip-skip"):
        FAMILY.encoder_specs(12, False, 2)


def test_lora_layout_reads_back_what_the_flux_reader_parses():
    """Every read prefix is one the Flux LoRA reader maps to the same module; the written prefix too; a
    Flux LoRA's metadata or keys name the family, an SD LoRA's do not."""
    names = [
        CTX,
        "transformer.transformer_blocks.0.attn.to_k",
        "text_encoder_2.encoder.block.1.layer.0.SelfAttention.v",
    ]
    for canon in names:
        pre = FAMILY.lora.read_prefixes(canon)
        assert pre and pre[0] == canon
        for p in pre:
            t = flux_lora.target_of(p)
            if t.bfl is not None:
                assert (t.bfl, t.pieces) == (diffusers_to_bfl(canon.split(".", 1)[1])[0], None), p
            else:
                assert (t.canonical or f"transformer.{t.diffusers}") == canon, p
    assert "lora_unet_txt_in" in FAMILY.lora.read_prefixes(CTX)
    assert families.lora_family_hint([], {"ss_base_model_version": "flux1"}) == "flux"
    assert families.lora_family_hint(["lora_unet_double_blocks_0_img_attn_qkv"], {}) == "flux"
    assert families.lora_family_hint(["lora_unet_down_blocks_0_attentions_0_proj_in"], {}) != "flux"
    assert FAMILY.lora.foreign(["lora_unet_down_blocks_0_attentions_0_proj_in"])
    assert FAMILY.lora.write_prefix(CTX) == CTX


def test_sampler_is_euler_on_the_shifted_rectified_flow_schedule():
    """dev: t' = e^μ/(e^μ + 1/t − 1) with μ = 1.15 on linspace(1, 0); schnell unshifted. For a constant
    velocity v = ε − x₀ (the exact one of x_t = (1−t)x₀ + tε) the Euler steps land on x₀."""
    dev = FlowSchedule(type("M", (), {"variant": "dev"})(), 4)
    want = [1.0] + [math.exp(1.15) / (math.exp(1.15) + (1 / t - 1)) for t in (0.75, 0.5, 0.25)]
    assert torch.allclose(dev.timesteps.double(), torch.tensor(want, dtype=torch.float64), atol=1e-6)
    sch = FlowSchedule(type("M", (), {"variant": "schnell"})(), 4)
    assert torch.allclose(sch.timesteps, torch.tensor([1.0, 0.75, 0.5, 0.25]))
    g = torch.Generator().manual_seed(0)
    x0, eps = (
        torch.randn(2, 16, 4, 4, generator=g, dtype=torch.float64),
        torch.randn(2, 16, 4, 4, generator=g, dtype=torch.float64),
    )
    for s in (dev, sch):
        x = s.start(eps)
        for t in s.timesteps:
            x = s.step(eps - x0, t, s.model_input(x, t))
        assert torch.allclose(x, x0, atol=1e-9)
    assert FAMILY.sampler.name == "rectified-flow"
    assert FAMILY.sampler.latent_shape(None, 64) == (16, 64, 64)
    assert FAMILY.sampler.latent_shape(None, 7) == (16, 8, 8)  # packed 2×2: an even side
    assert FAMILY.sampler.latent_shape(type("M", (), {"latent_channels": 1})(), 4) == (1, 4, 4)


@pytest.mark.parametrize("layout", ["bfl", "comfy", "diffusers"])
def test_load_model_reads_each_flux_layout(files, layout):
    from weightsmith.core.fluxmodel import FluxModel
    from weightsmith.core.model_io import load_model

    path, tes = files[layout]
    m = load_model(path, text_encoders=tes)
    assert isinstance(m, FluxModel) and m.family == "flux" and m.variant == "dev"
    assert set(m.text_encoders) == {"text_encoder", "text_encoder_2"}
    ref = load_flux(path, tes)
    assert torch.equal(m.weight(CTX), ref.weight(CTX))
    with pytest.raises(WeightsmithError, match="clip-skip"):
        load_model(path, text_encoders=tes, clip_skip=2)


def test_text_encoder_files_with_an_sd_model_are_refused(tiny_checkpoints, files):
    from weightsmith.core.model_io import load_model

    with pytest.raises(WeightsmithError, match="--text-encoder files are for Flux"):
        load_model(tiny_checkpoints["sd1"], text_encoders=files["bfl"][1])


def test_iteris_on_a_flux_checkpoint_from_the_cli(files, tmp_path, capsys):
    """``weightsmith merge --method iteris`` on a ComfyUI all-in-one Flux checkpoint (quick CPU settings): a
    one-LoRA merge is that LoRA, written as one LoRA file that reads back exactly."""
    from weightsmith.core.cli import main
    from weightsmith.core.flux_io import load_flux
    from weightsmith.core.lora_read import load_lora
    from weightsmith.core.safe_io import atomic_save_file

    g = torch.Generator().manual_seed(0)
    down, up = torch.randn(2, 32, generator=g) * 0.3, torch.randn(32, 2, generator=g) * 0.3
    lora = tmp_path / "f.safetensors"
    atomic_save_file(
        {f"{CTX}.lora_A.weight": down, f"{CTX}.lora_B.weight": up}, lora, {"ss_base_model_version": "flux1"}
    )
    out = tmp_path / "m.safetensors"
    rc = main(["merge", "--model", str(files["comfy"][0]), "--lora", str(lora), "--out", str(out)])
    err = capsys.readouterr().err
    assert rc == 0, err
    assert "Traceback" not in err
    back = load_lora(out, load_flux(files["comfy"][0]))
    want = up.double() @ down.double()
    assert float((back.modules[CTX].delta(torch.float64) - want).norm() / want.norm()) <= 1e-5


@pytest.mark.parametrize("layout", ["bfl", "comfy"])
def test_cli_lora_output_and_t5_file_applied_by_hand_equal_the_edit(files, tmp_path, capsys, layout):
    """``weightsmith erase --format lora`` on Flux: the LoRA (PEFT names, ΔW = B·A) plus the full T5 file
    beside it give back the erase's ΔW of every edited module (rel. error ≤ 1e-5), the T5 file keeps
    every other tensor of the base T5 as it was."""
    from weightsmith.core.cli import main
    from weightsmith.core.erase.options import EraseOptions
    from weightsmith.core.erase.pipeline import erase
    from weightsmith.core.model_io import load_model

    path, tes = files[layout]
    out = tmp_path / "no_vg.safetensors"
    args = ["erase", "--model", str(path), *[a for t in tes for a in ("--text-encoder", str(t))],
            "--target", "van gogh", "--anchor", "art", "--method", "erasepro", "--te-layers", "0-1",
            "--format", "lora", "--out", str(out), "--quiet"]  # fmt: skip
    assert main(args) == 0
    assert "no_vg_t5xxl.safetensors" in capsys.readouterr().out
    m = load_model(path, text_encoders=tes)
    edit = erase(m, ["van gogh"], ["art"], [], "erasepro", EraseOptions(te_layers=(0, 1)))
    t5_names = [n for n in edit.deltas if n.startswith("text_encoder_2.")]
    assert t5_names and CTX in edit.deltas and VEC in edit.deltas
    with safe_open(str(out), framework="pt") as f:
        lora = {k: f.get_tensor(k) for k in f.keys()}
        assert f.metadata()["ss_base_model_version"] == "flux1"
    for n in (CTX, VEC):
        d = lora[f"{n}.lora_B.weight"].double() @ lora[f"{n}.lora_A.weight"].double()
        ref = edit.deltas[n].double()
        assert float((d - ref).norm() / ref.norm()) <= 1e-5, n
    assert not any(k.startswith("text_encoder_2") for k in lora)
    t5_file = tmp_path / "no_vg_t5xxl.safetensors"
    prefix = "" if layout == "bfl" else "text_encoders.t5xxl.transformer."
    src = tes[1] if layout == "bfl" else path
    with safe_open(str(t5_file), framework="pt") as f, safe_open(str(src), framework="pt") as b:
        base_keys = [k[len(prefix) :] for k in b.keys() if k.startswith(prefix)]
        if layout == "bfl":
            base_keys = list(b.keys())
        assert sorted(f.keys()) == sorted(base_keys)
        edited = {n[len("text_encoder_2.") :] + ".weight": n for n in t5_names}
        for k in f.keys():
            new, old = f.get_tensor(k).double(), b.get_tensor(prefix + k).double()
            if k in edited:
                ref = edit.deltas[edited[k]].double()
                assert float(((new - old) - ref).norm() / ref.norm()) <= 1e-5, k
            else:
                assert torch.equal(new, old), k


@pytest.mark.parametrize("method", ["uce", "zero-residual", "erasepro"])
def test_hardening_rounds_lower_the_adversarial_residual_on_flux(files, method):
    """``harden_rounds`` on Flux goes through the pipeline's stage solve: a row per stage and round, the
    adversarial residual of ``txt_in`` falls round by round (one paired position per prompt: ``--tokens
    last``; UCE: the script's index), ``vector_in``'s is lower after two rounds, and the summary's
    conditioning residual is the worse of the two. Without rounds, the two conditioning rows alone."""
    from weightsmith.core.erase.options import EraseOptions
    from weightsmith.core.erase.pipeline import erase

    m = load_flux(*files["bfl"])
    kw = {} if method == "uce" else {"tokens": "last"}
    e0 = erase(m, ["van gogh"], ["art"], ["monet"], method, EraseOptions(**kw))
    assert [(r["stage"], r["round"]) for r in e0.report["hardening"]] == [("txt_in", 0), ("vector_in", 0)]
    e2 = erase(m, ["van gogh"], ["art"], ["monet"], method, EraseOptions(harden_rounds=2, **kw))
    rows = e2.report["hardening"]

    def adv(stage):
        rs = [r for r in rows if r["stage"] == stage]
        assert [r["round"] for r in rs] == [0, 1, 2]
        return [r["adv_residual"] for r in rs]

    txt, vec = adv("txt_in"), adv("vector_in")
    if method != "erasepro":  # (erasepro: the hardened T5 layers change txt_in's inputs)
        assert txt[0] == pytest.approx(e0.report["hardening"][0]["adv_residual"], rel=1e-9)
    assert txt[2] < txt[1] < txt[0] and txt[2] < txt[0] - 0.1
    assert vec[2] < vec[0]
    assert e2.report["hardening_summary"][-1]["adv_residual_unet"] == max(txt[2], vec[2])
    if method == "erasepro":  # every edited T5 layer hardened too
        t5 = {r["stage"] for r in rows} - {"txt_in", "vector_in"}
        assert t5 == {f"text_encoder_2.layer{i}" for i in range(m.t5.n_layers)}
    # the final solve is a different edit from the plain one, and still finite
    assert not torch.equal(e2.deltas[CTX], e0.deltas[CTX])
    assert all(bool(torch.isfinite(d).all()) for d in e2.deltas.values())
