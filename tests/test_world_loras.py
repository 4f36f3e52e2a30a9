import json

import pytest
import torch
from safetensors import safe_open

from weightsmith.core.world.metrics import concept_rate
from weightsmith.core.world.paths import LORA_STYLE, LORA_SUBJECT
from weightsmith.core.world.sample import load_model, sample
from weightsmith.core.world.train_loras import apply_lora, lora_target_modules

LORAS = [LORA_SUBJECT, LORA_STYLE]


@pytest.mark.parametrize("path", LORAS, ids=["subject", "style"])
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
        assert r == int(meta["ss_network_dim"]) and 4 <= r <= 8
        assert tensors[p + ".lora_up.weight"].shape[1] == r
        assert float(tensors[p + ".alpha"]) == float(meta["ss_network_alpha"])
    assert "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn2_to_k" in prefixes
    assert "lora_te_text_model_encoder_layers_0_self_attn_k_proj" in prefixes
    assert any(p.endswith("_mlp_fc1") for p in prefixes) and any(p.endswith("_ff_net_2") for p in prefixes)
    assert any(p.endswith("attn1_to_out_0") for p in prefixes)
    assert meta["ss_network_module"] == "networks.lora"
    assert meta["ss_base_model_version"] == "sd_v1"
    tags = json.loads(meta["ss_tag_frequency"])
    assert isinstance(tags, dict) and all(isinstance(v, dict) and v for v in tags.values())
    # every adapted module exists in the shipped model, with matching shapes
    m = load_model()
    targets = lora_target_modules(m.unet, m.text_encoder)
    for p in prefixes:
        w = targets[p].weight
        assert tensors[p + ".lora_up.weight"].shape[0] == w.shape[0]
        assert tensors[p + ".lora_down.weight"].shape[1] == w.shape[1]


def _rate(m, lora, prompts, attr, seed0=900):
    if lora is not None:
        m = load_model()
        n = apply_lora(m.unet, m.text_encoder, lora)
        assert n > 40
    imgs = sample(m.unet, m.text_encoder, m.tokenizer, m.scheduler, prompts, list(range(seed0, seed0 + len(prompts))),
                  steps=20, guidance=4.0)
    return concept_rate(imgs, **attr)


def test_loras_teach_their_concept_only_with_the_lora():
    base = load_model()
    cols = ["red", "green", "blue", "yellow", "purple", "orange", "cyan"]
    subj = [f"a {c} zq" for c in cols] * 2
    style = [f"a {c} {s}, zx style" for c, s in zip(cols * 2, ["circle", "square", "triangle", "cross", "diamond"] * 3)]
    assert _rate(base, None, subj, {"shape": "star"}) <= 0.15
    assert _rate(base, LORA_SUBJECT, subj, {"shape": "star"}) >= 0.6
    assert _rate(base, None, style, {"pattern": "stripes"}) <= 0.15
    assert _rate(base, LORA_STYLE, style, {"pattern": "stripes"}) >= 0.6
