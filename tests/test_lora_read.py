"""LoRA reader: every key layout maps the same LoRA to the same deltas; bad files fail clearly."""

import pytest
import torch
from safetensors.torch import save_file

from weightsmith.core.errors import WeightsmithError
from weightsmith.core.lab.random_loras import random_lora
from weightsmith.core.lora_read import load_lora, lora_from_state_dict
from weightsmith.core.naming import UNetLayout, comfy_te_prefix, kohya_prefix


def _expected(model, kohya):
    """ΔW per canonical module straight from kohya tensors: (alpha / r) · up @ down."""
    index = {kohya_prefix(n, model.family, model.layout): n for n in _all_modules(model)}
    out = {}
    for k, up in kohya.items():
        if not k.endswith(".lora_up.weight"):
            continue
        p = k[: -len(".lora_up.weight")]
        down = kohya[p + ".lora_down.weight"]
        r = down.shape[0]
        d = float(kohya[p + ".alpha"]) / r * (up.reshape(up.shape[0], r).double() @ down.reshape(r, -1).double())
        n = index[p]
        out[n] = d.reshape(model.weight(n).shape)
    return out


def _all_modules(model):
    names = []
    for c, te in model.text_encoders.items():
        for n, m in te.named_modules():
            if isinstance(m, torch.nn.Linear):
                names.append(f"{c}.text_model.{n}" if not n.startswith("text_model") else f"{c}.{n}")
    for n, m in model.unet.named_modules():
        if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)):
            names.append(f"unet.{n}")
    return names


def _other_formats(model, kohya):
    """The same LoRA as diffusers/PEFT keys, ComfyUI internal keys and full .diff deltas."""
    exp = _expected(model, kohya)
    layout = UNetLayout.from_config(model.unet_config)
    peft, comfy, diff = {}, {}, {}
    for i, (n, d) in enumerate(sorted(exp.items())):
        p = kohya_prefix(n, model.family, layout)
        up, down, alpha = kohya[p + ".lora_up.weight"], kohya[p + ".lora_down.weight"], kohya[p + ".alpha"]
        r = down.shape[0]
        comp, _, path = n.partition(".")
        peft[f"{comp}.{path}.lora_A.weight"] = down.reshape(r, -1).reshape(down.shape)
        peft[f"{comp}.{path}.lora_B.weight"] = up * (float(alpha) / r)  # PEFT files carry no alpha
        if comp == "unet":
            cp = "diffusion_model." + layout.to_ldm(path)
        else:  # ComfyUI clip keys, with and without the "text_encoders." of its generic format
            cp = ("text_encoders." if i % 2 else "") + comfy_te_prefix(model.family, comp) + path
        comfy[cp + ".lora_down.weight"] = down
        comfy[cp + ".lora_up.weight"] = up
        comfy[cp + ".alpha"] = alpha
        diff[p + ".diff"] = d.float()
    return {"peft": peft, "comfy": comfy, "diff": diff}


@pytest.mark.parametrize("family", ["sd1", "sd2", "sdxl"])
def test_every_format_maps_to_the_same_deltas(tiny_models, family):
    model = tiny_models[family]
    kohya, meta = random_lora(model, groups=("attn", "ff", "te", "conv"), rank=4, seed=3)
    exp = _expected(model, kohya)
    assert any(model.weight(n).dim() == 4 and model.weight(n).shape[-1] == 3 for n in exp)  # 3×3 convs present
    if family == "sdxl":
        assert any(k.startswith("lora_te2_") for k in kohya) and any("input_blocks" in k for k in kohya)
    got = lora_from_state_dict(kohya, model, metadata=meta, name="k")
    assert set(got.modules) == set(exp) and not got.unmatched
    for fmt, tensors in _other_formats(model, kohya).items():
        lora = lora_from_state_dict(tensors, model, name=fmt)
        assert set(lora.modules) == set(exp), fmt
        assert not lora.unmatched, (fmt, lora.unmatched[:3])
        for n, d in exp.items():
            torch.testing.assert_close(
                lora.modules[n].delta(torch.float64), d, rtol=1e-5, atol=1e-6 * float(d.abs().max()), msg=f"{fmt} {n}"
            )


def test_locon_mid_loha_lokr_and_unmatched(tiny_models):
    model = tiny_models["sd1"]
    g = torch.Generator().manual_seed(0)
    conv = "unet.down_blocks.0.resnets.0.conv1"  # 3×3
    lin = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
    fc = "text_encoder.text_model.encoder.layers.1.mlp.fc1"
    out_c, in_c, kh, kw = model.weight(conv).shape
    r = 3
    down = torch.randn(r, in_c, 1, 1, generator=g)
    mid = torch.randn(r, r, kh, kw, generator=g)
    up = torch.randn(out_c, r, 1, 1, generator=g)
    o, i = model.weight(lin).shape
    w1a, w1b, w2a, w2b = (
        torch.randn(o, 2, generator=g),
        torch.randn(2, i, generator=g),
        torch.randn(o, 2, generator=g),
        torch.randn(2, i, generator=g),
    )
    fo, fi = model.weight(fc).shape
    k1 = torch.randn(4, 2, generator=g)
    k2a, k2b = torch.randn(fo // 4, 2, generator=g), torch.randn(2, fi // 2, generator=g)
    pc, pl, pf = (kohya_prefix(n, "sd1", model.layout) for n in (conv, lin, fc))
    sd = {
        pc + ".lora_down.weight": down,
        pc + ".lora_mid.weight": mid,
        pc + ".lora_up.weight": up,
        pc + ".alpha": torch.tensor(1.5),
        pl + ".hada_w1_a": w1a,
        pl + ".hada_w1_b": w1b,
        pl + ".hada_w2_a": w2a,
        pl + ".hada_w2_b": w2b,
        pl + ".alpha": torch.tensor(1.0),
        pf + ".lokr_w1": k1,
        pf + ".lokr_w2_a": k2a,
        pf + ".lokr_w2_b": k2b,
        pf + ".alpha": torch.tensor(4.0),
        "lora_unet_no_such_block_to_q.lora_down.weight": torch.zeros(2, 4),
        "lora_unet_no_such_block_to_q.lora_up.weight": torch.zeros(4, 2),
    }
    lora = lora_from_state_dict(sd, model, name="lyco")
    # independent expectations
    exp_conv = (
        1.5 / r * torch.einsum("oa,abhw,bi->oihw", up[:, :, 0, 0].double(), mid.double(), down[:, :, 0, 0].double())
    )
    exp_lin = 1.0 / 2 * (w1a.double() @ w1b.double()) * (w2a.double() @ w2b.double())
    exp_fc = 4.0 / 2 * torch.kron(k1.double(), k2a.double() @ k2b.double())
    for n, e in ((conv, exp_conv), (lin, exp_lin), (fc, exp_fc)):
        torch.testing.assert_close(lora.modules[n].delta(torch.float64), e, rtol=1e-5, atol=1e-6 * float(e.abs().max()))
    assert lora.modules[conv].kind == "locon" and lora.modules[lin].kind == "loha" and lora.modules[fc].kind == "lokr"
    assert len(lora.unmatched) == 2 and all("no_such_block" in k for k in lora.unmatched)


def test_bad_files_fail_clearly(tiny_models, tmp_path):
    sd1, sdxl = tiny_models["sd1"], tiny_models["sdxl"]
    xl, _ = random_lora(sdxl, groups=("attn", "te"), rank=2, seed=1)
    save_file(xl, str(tmp_path / "xl.safetensors"))
    with pytest.raises(WeightsmithError, match="SDXL"):
        load_lora(tmp_path / "xl.safetensors", sd1)
    (tmp_path / "bad.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json" + b"\0" * 40)
    with pytest.raises(WeightsmithError, match="damaged"):
        load_lora(tmp_path / "bad.safetensors", sd1)
    ok, _ = random_lora(sd1, groups=("te",), rank=2, seed=1)
    key = next(k for k in ok if k.endswith("lora_up.weight"))
    ok[key] = ok[key].clone()
    ok[key][0, 0] = float("nan")
    save_file(ok, str(tmp_path / "nan.safetensors"))
    with pytest.raises(WeightsmithError, match="NaN"):
        load_lora(tmp_path / "nan.safetensors", sd1)
    with pytest.raises(WeightsmithError, match="NaN"):
        load_lora(tmp_path / "nan.safetensors")  # checked even before mapping
    with pytest.raises(WeightsmithError, match="not found"):
        load_lora(tmp_path / "missing.safetensors", sd1)
    oft = {"lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.oft_blocks": torch.zeros(4, 8, 8)}
    with pytest.raises(WeightsmithError, match="OFT"):
        lora_from_state_dict(oft, sd1, name="oft")
    # an SD1 LoRA whose shapes do not fit (another model's widths) names the module and the fix
    wrong = {
        "lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight": torch.zeros(2, 77),
        "lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight": torch.zeros(128, 2),
    }
    with pytest.raises(WeightsmithError, match="does not fit"):
        lora_from_state_dict(wrong, sd1, name="wrong")
