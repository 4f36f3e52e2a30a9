"""Model families as one module each (docs/method.md, "Model families"): the registry, each SD family's
declarations against what the model and its files really are, and a planted family module that is
registered and detected with no other change."""

import sys
import textwrap

import pytest
import torch

from weightsmith.core import families
from weightsmith.core.erase import EraseOptions, erase
from weightsmith.core.errors import WeightsmithError
from weightsmith.core.families.base import TE1, TE2, Family
from weightsmith.core.lora_read import ModuleIndex

SD = ("sd1", "sd2", "sdxl")


def test_the_registry_lists_the_sd_families():
    assert set(SD) <= set(families.names())
    assert [families.get(n).label for n in SD] == ["SD1.x", "SD2.x", "SDXL"]
    assert all(isinstance(families.get(n), Family) for n in SD)
    assert families.get(families.get("sd2")) is families.get("sd2")
    from weightsmith.core.naming import FAMILY_LABELS, SUPPORTED_FAMILIES, family_label

    assert {k: FAMILY_LABELS[k] for k in SD} == {"sd1": "SD1.x", "sd2": "SD2.x", "sdxl": "SDXL"}
    assert SUPPORTED_FAMILIES.startswith("SD1.x, SD2.x") and "SDXL" in SUPPORTED_FAMILIES
    assert family_label("sdxl") == "SDXL" and family_label("nope") == "nope"
    with pytest.raises(WeightsmithError, match="unknown model family 'nope'"):
        families.get("nope")


@pytest.mark.parametrize("family", SD)
def test_components_and_detection_of_the_tiny_models(tiny_models, tiny_checkpoints, family):
    model = tiny_models[family]
    fam = families.get(family)
    # the declared text encoders are the model's, in conditioning order, and the denoiser is the UNet
    assert fam.text_encoder_names == list(model.text_encoders)
    assert fam.denoiser.name == "unet"
    # OpenCLIP encoders (gelu) are declared open_clip, CLIP-L (quick_gelu) clip
    for comp, te in model.text_encoders.items():
        assert (fam.component(comp).kind == "open_clip") == (te.config.hidden_act == "gelu")
    cfgs = [t.config for t in model.text_encoders.values()]
    assert families.detect_from_components(cfgs, model.unet_config) == family
    # a single-file checkpoint of the model: its keys say the family, and sit under the declared prefixes
    from safetensors import safe_open

    with safe_open(str(tiny_checkpoints[family]), framework="pt") as f:
        keys = list(f.keys())
    assert families.detect_from_keys(keys) == family
    for comp in model.text_encoders:
        prefix, _ = fam.checkpoint.te_prefix(comp)
        assert any(k.startswith(prefix) for k in keys), prefix
    assert any(k.startswith(fam.checkpoint.denoiser_prefix) for k in keys)
    # every parameter of the model has its declared slot in the file, with the right number of values
    layout = model.layout
    hidden = {c: t.config.hidden_size for c, t in model.text_encoders.items()}
    with safe_open(str(tiny_checkpoints[family]), framework="pt") as f:
        for comp, te in model.text_encoders.items():
            for n, p in te.named_parameters():
                from weightsmith.core.naming import te_path

                slot = fam.checkpoint.slot(f"{comp}.{te_path(n)}", layout, hidden)
                shape = f.get_slice(slot.key).get_shape()
                rows = slot.rows[1] - slot.rows[0] if slot.rows else shape[0]
                assert rows * int(torch.Size(shape[1:]).numel()) == p.numel(), slot
        for n, p in list(model.unet.named_parameters())[:40]:
            slot = fam.checkpoint.slot(f"unet.{n}", layout)
            assert int(torch.Size(f.get_slice(slot.key).get_shape()).numel()) == p.numel(), slot


def test_detection_refusals_name_what_the_file_is():
    with pytest.raises(WeightsmithError, match="UNet-only file"):
        families.detect_from_keys(["model.diffusion_model.input_blocks.0.0.weight"])
    with pytest.raises(WeightsmithError, match="is a LoRA"):
        families.detect_from_keys(["lora_unet_down_blocks_0.lora_down.weight"])
    with pytest.raises(WeightsmithError, match="not a Stable Diffusion model"):
        families.detect_from_keys(["foo.bar"])
    with pytest.raises(WeightsmithError, match="found 3 text encoders"):
        families.detect_from_components([object(), object(), object()])


@pytest.mark.parametrize("family", SD)
def test_conditioning_is_what_the_family_reads(tiny_models, family):
    """Independent of the family code: SD1/SD2 read one encoder through its final LayerNorm; SDXL
    concatenates both penultimate layers raw and adds bigG's projected pooled output."""
    model = tiny_models[family]
    prompts = ["a red circle", "a blue square"]
    cond = model.encode(prompts)
    with torch.no_grad():
        if family == "sdxl":
            outs = {c: model.encoder_outputs(c, model.tokenize(prompts, c)) for c in (TE1, TE2)}
            want = torch.cat([outs[TE1].hidden_states[-2], outs[TE2].hidden_states[-2]], -1)
            assert torch.equal(cond.pooled, outs[TE2].text_embeds.float())
        else:
            out = model.encoder_outputs(TE1, model.tokenize(prompts, TE1))
            te = model.text_encoders[TE1]
            norm = te.text_model.final_layer_norm if hasattr(te, "text_model") else te.final_layer_norm
            want = norm(out.hidden_states[-1])
            assert cond.pooled is None
    assert torch.equal(cond.context, want.float())


# the text-encoder layers each family's erasure edits (docs/method.md, "Model families"): every layer
# feeding the read hidden state; SDXL's bigG all of them, its pooled output reads the last one
TE_LAYERS = {"sd1": {TE1: 0}, "sd2": {TE1: 0}, "sdxl": {TE1: -1, TE2: 0}}


def _cross_attention_blocks(unet) -> list[str]:
    """Every attn2 of the UNet, down blocks then the mid block then the up blocks (from the modules)."""
    names = [f"unet.{n}" for n, _ in unet.named_modules() if n.endswith(".attn2")]
    part = lambda n: 0 if ".down_blocks." in n else (1 if ".mid_block." in n else 2)  # noqa: E731
    return sorted(names, key=lambda n: (part(n), names.index(n)))


@pytest.mark.parametrize("family", SD)
def test_erase_stages_list_the_layers_the_pipeline_edits(tiny_models, family):
    model = tiny_models[family]
    fam = families.get(family)
    stages = fam.erase.encoder_stages(model)
    assert [s.component for s in stages] == list(model.text_encoders)
    (cond,) = fam.erase.conditioning_stages
    assert (cond.label, cond.reads) == ("unet", "context")
    blocks = _cross_attention_blocks(model.unet)
    assert cond.linears(model, ("to_k", "to_v")) == [f"{b}.{s}" for b in blocks for s in ("to_k", "to_v")]
    assert model.unet_cross_attention_names() == blocks
    # a run of erasepro edits exactly these: k/v of the read layers of every encoder, then every attn2 k/v
    edit = erase(model, ["van gogh"], ["art"], options=EraseOptions(expand_prompts=False))
    want = set()
    for comp, te in model.text_encoders.items():
        n = te.config.num_hidden_layers + TE_LAYERS[family][comp]
        want |= {f"{comp}.text_model.encoder.layers.{i}.self_attn.{s}" for i in range(n) for s in ("k_proj", "v_proj")}
    want |= {f"{b}.{s}" for b in blocks for s in ("to_k", "to_v")}
    assert set(edit.deltas) == want
    stage_order = list(dict.fromkeys(s["stage"] for s in edit.report["stages"]))
    te_stages = [
        f"{c}.layer{i}"
        for c, te in model.text_encoders.items()
        for i in range(te.config.num_hidden_layers + TE_LAYERS[family][c])
    ]
    assert stage_order == te_stages + ["unet"]


@pytest.mark.parametrize("family", SD)
def test_lora_prefixes_read_back_and_write_kohya_names(tiny_models, family):
    model = tiny_models[family]
    fam = families.get(family)
    layout = model.layout
    attn = model.unet_cross_attention_names()[0] + ".to_k"
    path = attn.split(".", 1)[1]
    want_unet = "lora_unet_" + (layout.to_ldm(path) if family == "sdxl" else path).replace(".", "_")
    assert fam.lora.write_prefix(attn, layout) == want_unet
    k = f"{TE1}.text_model.encoder.layers.0.self_attn.k_proj"
    te_pre = "lora_te1_" if family == "sdxl" else "lora_te_"
    assert fam.lora.write_prefix(k, layout) == te_pre + "text_model_encoder_layers_0_self_attn_k_proj"
    # every written prefix, and every declared read prefix, finds its module in the model's index
    index = ModuleIndex(model)
    for canon in (attn, k):
        assert index.lookup(fam.lora.write_prefix(canon, layout)) == canon
        for p in fam.lora.read_prefixes(canon, layout):
            assert index.lookup(p) == canon, p
    assert fam.lora.base_model_version == {"sd1": "sd_v1", "sd2": "sd_v2", "sdxl": "sdxl_base_v1-0"}[family]
    assert families.lora_family_hint([], {"ss_base_model_version": fam.lora.base_model_version}) == family


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_the_sampler_is_ddim_with_the_unet_call(tiny_models, family):
    model = tiny_models[family]
    sampler = families.get(family).sampler
    assert sampler.name == "ddim"
    cfg = model.unet_config
    shape = sampler.latent_shape(model, None)
    assert shape == (cfg["in_channels"], cfg.get("sample_size", 64), cfg.get("sample_size", 64))
    sched = sampler.schedule(model, 3)
    # "trailing" spacing (diffusers): round(1000 - k * 1000 / steps) - 1, the noisiest first
    assert [int(t) for t in sched.timesteps] == [round(1000 - k * 1000 / 3) - 1 for k in range(3)]
    x = torch.randn((1, shape[0], 8, 8), generator=torch.Generator().manual_seed(0))
    cond = model.encode(["a red circle"])
    t = sched.timesteps[0]
    got = sampler.predict(model, model.unet, x, t, cond.context, cond.pooled)
    kw = {}
    if family == "sdxl":  # independent: the size/crop ids of a 64 px image, no crop
        kw["added_cond_kwargs"] = {"text_embeds": cond.pooled, "time_ids": torch.tensor([[64.0, 64, 0, 0, 64, 64]])}
    want = model.unet(x, t, encoder_hidden_states=cond.context, **kw).sample
    assert torch.equal(got, want)


def test_a_planted_family_module_is_registered_and_detected(tmp_path):
    """Adding a family is adding one module: a package holding one module that defines ``FAMILY``
    is discovered, detected from its keys and components, and labelled, with nothing else changed."""
    pkg = tmp_path / "planted_families"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "fakefam.py").write_text(
        textwrap.dedent(
            """
            import dataclasses

            from weightsmith.core.families import sd1
            from weightsmith.core.families.sd_common import has_prefix

            FAMILY = dataclasses.replace(
                sd1.FAMILY,
                name="fakefam",
                label="Fake 1.0",
                priority=-1,
                recognise_keys=has_prefix("fake_model.text."),
                recognise_components=lambda tes, den=None: getattr(tes[0], "fake", False),
            )
            """
        )
    )
    sys.path.insert(0, str(tmp_path))
    try:
        assert families.discover("planted_families") == ["fakefam"]
        assert "fakefam" in families.names()
        assert families.detect_from_keys({"fake_model.text.x", "model.diffusion_model.y"}) == "fakefam"
        te_cfg = type("Cfg", (), {"fake": True, "hidden_size": 32, "hidden_act": "quick_gelu"})()
        assert families.detect_from_components([te_cfg], None) == "fakefam"
        assert families.label("fakefam") == "Fake 1.0"
        assert "Fake 1.0" in families.supported_phrase()
        # the other families are untouched: an SD1 checkpoint is still SD1
        assert families.detect_from_keys({"cond_stage_model.transformer.x"}) == "sd1"
        from weightsmith.core.tokenizer import pad_token_for

        assert pad_token_for("fakefam", TE1) == pad_token_for("sd1", TE1)
    finally:
        families.unregister("fakefam")
        sys.path.remove(str(tmp_path))
        sys.modules.pop("planted_families.fakefam", None)
        sys.modules.pop("planted_families", None)
    assert "fakefam" not in families.names()
    with pytest.raises(WeightsmithError):
        families.get("fakefam")
