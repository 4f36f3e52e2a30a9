"""Our written LoRAs load in diffusers with the same effect as our own application."""
import copy

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from weightsmith.core.lora_read import lora_from_state_dict
from weightsmith.core.merge import merge, save_merge
from weightsmith.core.merge.random_loras import random_lora


def _pipeline(model):
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline

    vae = AutoencoderKL(block_out_channels=(8,), down_block_types=("DownEncoderBlock2D",),
                        up_block_types=("UpDecoderBlock2D",), latent_channels=4, norm_num_groups=8)
    return StableDiffusionPipeline(vae=vae, text_encoder=copy.deepcopy(model.text_encoders["text_encoder"]),
                                   tokenizer=model.tokenizers["text_encoder"], unet=copy.deepcopy(model.unet),
                                   scheduler=DDIMScheduler(clip_sample=False, steps_offset=1), safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)


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
    loras = [lora_from_state_dict(random_lora(model, groups=g, rank=r, seed=s)[0], model, name=f"l{s}")
             for s, g, r in ((1, ("attn", "ff", "te", "conv"), 4), (2, ("attn", "te"), 2))]
    edit = merge(model, loras, "concat", weights=[1.0, 0.5])
    out = tmp_path / "merged.safetensors"
    save_merge(edit, model, out, loras=loras)
    with safe_open(str(out), "pt") as f:
        meta = f.metadata()
        keys = list(f.keys())
    assert meta["ss_base_model_version"] == "sd_v1" and meta["ws_method"] == "concat"
    assert all(k.startswith(("lora_unet_", "lora_te_")) for k in keys)
    assert sum(k.endswith(".alpha") for k in keys) == len(edit.deltas)

    pipe = _pipeline(model)
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
        assert float((e_ours - base).abs().max()) > 1e-3          # the LoRA does something


def test_fused_open_clip_siblings_are_completed(tiny_models, tmp_path):
    """SD2's OpenCLIP attention is fused in A1111: q, k, v and out must all be in the file."""
    from weightsmith.core.edit import Edit
    from weightsmith.core.lora_read import load_lora
    from weightsmith.core.lora_write import save_lora

    model = tiny_models["sd2"]
    n = "text_encoder.text_model.encoder.layers.1.self_attn.k_proj"
    up, down = torch.randn(model.weight(n).shape[0], 2), torch.randn(2, model.weight(n).shape[1])
    e = Edit("sd2", model.unet_config, {n: up @ down}, {n: (up, down)}, {"method": "test"})
    save_lora(e, tmp_path / "plain.safetensors")
    save_lora(e, tmp_path / "full.safetensors", complete_fused=True)
    assert len(load_file(str(tmp_path / "plain.safetensors"))) == 3
    back = load_lora(tmp_path / "full.safetensors", model)
    subs = {k.rsplit(".", 1)[1] for k in back.modules}
    assert subs == {"q_proj", "k_proj", "v_proj", "out_proj"}
    torch.testing.assert_close(back.modules[n].delta(), up @ down, rtol=1e-5, atol=1e-6)
    assert all(float(m.delta().abs().max()) == 0 for k, m in back.modules.items() if k != n)
