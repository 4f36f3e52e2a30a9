"""Weights held in bf16, computed in float32 (core.precision): the same outputs as a float32 model
holding the very same (rounded) weights."""

import torch
import torch.nn.functional as F

from weightsmith.core.lab.random_models import build_random_model
from weightsmith.core.precision import hold_weights


def test_held_layers_compute_in_float32_with_their_rounded_weights():
    torch.manual_seed(0)
    lin, conv = torch.nn.Linear(6, 5), torch.nn.Conv2d(3, 4, 3, padding=1)
    hold_weights(lin)
    hold_weights(conv)
    assert lin.weight.dtype == conv.weight.dtype == torch.bfloat16 and lin.bias.dtype == torch.float32
    x = torch.randn(2, 6, dtype=torch.bfloat16)
    y = lin(x)
    assert y.dtype == torch.float32
    assert torch.equal(y, F.linear(x.float(), lin.weight.float(), lin.bias))
    z = torch.randn(1, 3, 5, 5)
    assert torch.equal(conv(z), F.conv2d(z, conv.weight.float(), conv.bias, padding=1))


def test_a_held_model_matches_float32_with_the_same_weights():
    held = build_random_model("sdxl", "tiny", seed=3, weights_dtype=torch.bfloat16)
    ref = build_random_model("sdxl", "tiny", seed=3)
    for a, b in ((held.unet, ref.unet), *zip(held.text_encoders.values(), ref.text_encoders.values())):
        b.load_state_dict({k: v.float() for k, v in a.state_dict().items()})
    cond_h, cond_r = held.encode(["a red cat"]), ref.encode(["a red cat"])
    torch.testing.assert_close(cond_h.context, cond_r.context, rtol=1e-5, atol=1e-5)
    z = torch.randn(1, 4, 8, 8)
    kw = {"text_embeds": cond_h.pooled, "time_ids": torch.tensor([[64, 64, 0, 0, 64, 64]], dtype=torch.float32)}
    with torch.no_grad():
        out_h = held.unet(z, 500, encoder_hidden_states=cond_h.context, added_cond_kwargs=kw).sample
        out_r = ref.unet(z, 500, encoder_hidden_states=cond_h.context, added_cond_kwargs=kw).sample
    assert out_h.dtype == torch.float32
    torch.testing.assert_close(out_h, out_r, rtol=1e-5, atol=1e-5)


def test_a_checkpoint_loaded_in_bf16_holds_the_files_weights_rounded(tmp_path):
    """load_model(weights_dtype=bf16): each UNet Linear/Conv weight is the file's tensor rounded to
    bf16, every other tensor (norms, biases) the file's exactly, in float32; and it computes like a
    float32 UNet holding those same rounded weights."""
    from safetensors.torch import load_file

    from weightsmith.core.model_io import load_model, save_single_file
    from weightsmith.core.naming import UNetLayout

    m = build_random_model("sd1", "tiny", seed=4)
    ck = tmp_path / "m.safetensors"
    save_single_file(m, ck)
    raw = load_file(str(ck))
    held = load_model(ck, tokenizer=m.tokenizers["text_encoder"], weights_dtype="bfloat16")
    layout = UNetLayout.from_config(held.unet_config)
    n_half = 0
    for name, mod in held.unet.named_modules():
        for leaf, p in mod.named_parameters(recurse=False):
            want = raw["model.diffusion_model." + layout.to_ldm(name) + "." + leaf]
            if isinstance(mod, (torch.nn.Linear, torch.nn.Conv2d)) and leaf == "weight":
                assert p.dtype == torch.bfloat16 and torch.equal(p, want.to(torch.bfloat16).reshape(p.shape))
                n_half += 1
            else:
                assert p.dtype == torch.float32 and torch.equal(p, want.float().reshape(p.shape)), name
    assert n_half > 20
    ref = load_model(ck, tokenizer=m.tokenizers["text_encoder"])
    ref.unet.load_state_dict({k: v.float() for k, v in held.unet.state_dict().items()})
    ctx = held.encode(["a red cat"]).context
    z = torch.randn(1, 4, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(
            held.unet(z, 300, encoder_hidden_states=ctx).sample,
            ref.unet(z, 300, encoder_hidden_states=ctx).sample,
            rtol=1e-5,
            atol=1e-5,
        )


def test_unknown_weights_precision_is_a_clear_error(tmp_path):
    import pytest

    from weightsmith.core.errors import WeightsmithError
    from weightsmith.core.model_io import load_model

    with pytest.raises(WeightsmithError, match="unknown weights precision 'fp8'.*bfloat16"):
        load_model(tmp_path / "x.safetensors", weights_dtype="fp8")
