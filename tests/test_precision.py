"""Weights held in bf16, computed in float32 (core.precision): the same outputs as a float32 model
holding the very same (rounded) weights."""
import torch
import torch.nn.functional as F

from weightsmith.core.precision import hold_weights
from weightsmith.core.random_models import build_random_model


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
