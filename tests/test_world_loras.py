import json

import pytest
from safetensors import safe_open

from weightsmith.core.world.metrics import concept_rate, image_drift
from weightsmith.core.world.paths import LORA_STYLE, LORA_STYLE_NOREG, LORA_SUBJECT, LORA_SUBJECT_NOREG
from weightsmith.core.world.sample import load_model, sample
from weightsmith.core.world.training.train_loras import apply_lora, lora_target_modules, trigger_prompts

pytestmark = pytest.mark.usefixtures("one_thread")


LORAS = [LORA_SUBJECT, LORA_STYLE, LORA_SUBJECT_NOREG, LORA_STYLE_NOREG]


@pytest.mark.parametrize("path", LORAS, ids=["subject", "style", "subject_noreg", "style_noreg"])
def test_lora_file_is_kohya_format(path):
    with safe_open(str(path), "pt") as f:
        keys = set(f.keys())
        meta = f.metadata()
        tensors = {k: f.get_tensor(k) for k in keys}
    prefixes = {k.split(".")[0] for k in keys}
    for p in prefixes:
        assert {p + ".lora_down.weight", p + ".lora_up.weight", p + ".alpha"} <= keys
        assert p.startswith("lora_unet_") or p.startswith("lora_te_text_model_encoder_layers_")
        r = tensors[p + ".lora_down.weight"].shape[0]
        conv3 = tensors[p + ".lora_down.weight"].dim() == 4 and tensors[p + ".lora_down.weight"].shape[-1] == 3
        args = json.loads(meta.get("ss_network_args") or "{}")
        want = int(args["conv_dim"]) if conv3 else int(meta["ss_network_dim"])
        assert r == want and 4 <= r <= 8
        assert tensors[p + ".lora_up.weight"].shape[1] == r
        alpha = float(args["conv_alpha"]) if conv3 else float(meta["ss_network_alpha"])
        assert float(tensors[p + ".alpha"]) == alpha
    assert "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn2_to_k" in prefixes
    assert "lora_te_text_model_encoder_layers_0_self_attn_k_proj" in prefixes
    assert any(p.endswith("_mlp_fc1") for p in prefixes) and any(p.endswith("_ff_net_2") for p in prefixes)
    assert any(p.endswith("attn1_to_out_0") for p in prefixes)
    assert meta["ss_network_module"] == "networks.lora"
    assert meta["ss_base_model_version"] == "sd_v1"
    # the interfering pair is trained without regularization images, the clean pair with them
    assert (int(meta["ss_num_reg_images"]) == 0) == path.stem.endswith("_noreg")
    tags = json.loads(meta["ss_tag_frequency"])
    assert isinstance(tags, dict) and all(isinstance(v, dict) and v for v in tags.values())
    # every adapted module exists in the shipped model, with matching shapes
    m = load_model()
    targets = lora_target_modules(m.unet, m.text_encoder, conv=True)
    for p in prefixes:
        w = targets[p].weight
        assert tensors[p + ".lora_up.weight"].shape[0] == w.shape[0]
        assert tensors[p + ".lora_down.weight"].shape[1] == w.shape[1]


def _sample(lora, prompts, seed0=900):
    m = load_model()
    if lora is not None:
        assert apply_lora(m.unet, m.text_encoder, lora) > 40
    return sample(
        m.unet, m.text_encoder, m.tokenizer, m.scheduler, prompts, list(range(seed0, seed0 + len(prompts))), steps=20
    )


COLS = ["red", "green", "blue", "yellow", "purple", "orange", "cyan"]


@pytest.mark.slow
@pytest.mark.parametrize("which,path", [("subject", LORA_SUBJECT), ("subject_noreg", LORA_SUBJECT_NOREG)])
def test_subject_lora_teaches_star_only_with_the_lora(which, path):
    prompts = trigger_prompts(which, 14)
    # the bars: <= 5% without the LoRA, >= 80% with it (model card: 56 prompts, 25 steps)
    assert concept_rate(_sample(None, prompts), shape="star") <= 0.05
    assert concept_rate(_sample(path, prompts), shape="star") >= 0.8


@pytest.mark.slow
@pytest.mark.parametrize("which,path", [("style", LORA_STYLE), ("style_noreg", LORA_STYLE_NOREG)])
def test_style_lora_teaches_stripes_only_with_the_lora(which, path):
    prompts = trigger_prompts(which, 35)  # 7 colours x 5 shapes + the trigger phrase
    base, styled = _sample(None, prompts), _sample(path, prompts)
    assert concept_rate(base, pattern="stripes") <= 0.05
    assert concept_rate(styled, pattern="stripes") >= 0.8
    assert image_drift(base, styled) > 0.02


@pytest.mark.slow
def test_clean_pair_does_not_bleed_and_the_interfering_pair_does():
    """The regularized LoRAs leave prompts without their trigger alone; the pair trained without
    regularization images bleeds its trait into them (what makes it interfere when summed)."""
    plain = [
        f"a {c} {s}" for c, s in zip(COLS, ["circle", "square", "triangle", "cross", "diamond", "circle", "square"])
    ] * 2
    assert concept_rate(_sample(LORA_SUBJECT, plain), shape="star") <= 0.15
    assert concept_rate(_sample(LORA_STYLE, plain), pattern="stripes") <= 0.15
    assert concept_rate(_sample(LORA_STYLE_NOREG, plain), pattern="stripes") >= 0.3


def test_conv_adapter_file_matches_the_trained_hook(tmp_path):
    """A 3x3-conv (LoCon / kohya conv_dim) adapter: what the training hook computes equals the
    base conv with the weight delta that the core LoRA reader builds from the saved file."""
    import torch
    import torch.nn.functional as F
    from safetensors.torch import save_file

    from weightsmith.core.lora_read import load_lora
    from weightsmith.core.model_io import load_model as load_sd
    from weightsmith.core.world.paths import DEFAULT_MODEL_DIR
    from weightsmith.core.world.training.train_loras import attach_loras, lora_state_dict

    m = load_model()
    hooks = attach_loras(m.unet, m.text_encoder, rank=4, alpha=2.0, conv_rank=3, conv_alpha=1.5)
    name = "lora_unet_down_blocks_0_resnets_0_conv1"
    assert name in hooks and "lora_unet_down_blocks_0_downsamplers_0_conv" in hooks
    g = torch.Generator().manual_seed(0)
    for h in hooks.values():
        h.up.data = torch.randn(h.up.shape, generator=g) * 0.1
    conv = m.unet.down_blocks[0].resnets[0].conv1
    x = torch.randn(2, conv.in_channels, 32, 32, generator=g)
    with torch.no_grad():
        hooked = conv(x)
    path = tmp_path / "locon.safetensors"
    sd = lora_state_dict(hooks)
    assert sd[name + ".lora_down.weight"].shape == (3, conv.in_channels, 3, 3)
    assert sd[name + ".lora_up.weight"].shape == (conv.out_channels, 3, 1, 1)
    save_file(sd, str(path))
    for h in hooks.values():
        h.remove()
    lora = load_lora(path, load_sd(DEFAULT_MODEL_DIR))
    delta = lora.modules["unet.down_blocks.0.resnets.0.conv1"].delta()
    with torch.no_grad():
        merged = F.conv2d(x, conv.weight + delta, conv.bias, conv.stride, conv.padding)
    assert torch.allclose(hooked, merged, atol=1e-4), (hooked - merged).abs().max()
    assert (hooked - conv(x)).abs().max() > 1e-3  # the adapter is not a no-op here


@pytest.mark.slow
def test_the_interfering_pair_fails_under_linear_merging():
    """The issue's bar for the interfering pair: summed (linear merging, both at weight 1), the other
    LoRA's trait leaks into each LoRA's prompts on >= 30% of them, as stacking two community LoRAs does.
    Merged here with the training code's own ``apply_lora`` (not the core merge)."""
    m = load_model()
    assert apply_lora(m.unet, m.text_encoder, LORA_SUBJECT_NOREG) > 40
    assert apply_lora(m.unet, m.text_encoder, LORA_STYLE_NOREG) > 40
    star_prompts, stripe_prompts = trigger_prompts("subject_noreg", 14), trigger_prompts("style_noreg", 14)
    imgs = sample(
        m.unet, m.text_encoder, m.tokenizer, m.scheduler, star_prompts + stripe_prompts, list(range(950, 978)), steps=20
    )
    stripes_on_star = concept_rate(imgs[:14], pattern="stripes")
    star_on_stripes = concept_rate(imgs[14:], shape="star")
    assert max(stripes_on_star, star_on_stripes) >= 0.3, (stripes_on_star, star_on_stripes)
