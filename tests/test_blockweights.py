"""Block weights (docs/merge.md, "Block weights") against LoRA Block Weight's own definition.

The tables below are typed by hand: for each module, the key A1111's LoRA extension gives it (LDM
naming, ``_`` for ``.``) and the block id LoRA Block Weight's ``ratiodealer`` finds for that key by
substring match on its ``BLOCKS`` list (hako-mikan/sd-webui-lora-block-weight,
scripts/lora_block_weight.py). ``lbw_block`` below re-implements that substring rule from the same
source, so each row is checked twice: the typed id, and LBW's rule on the typed key.
"""

import pytest
import torch
from safetensors.torch import load_file

from weightsmith.core import blockweights as bwm
from weightsmith.core.errors import WeightsmithError
from weightsmith.core.lab.random_loras import random_lora
from weightsmith.core.lora_read import load_lora, lora_from_state_dict
from weightsmith.core.merge import MergeOptions, merge
from weightsmith.core.naming import UNetLayout, kohya_prefix

# LBW's BLOCKS (index i <-> BLOCKID26[i]; the last two also mean BASE), copied from its source
LBW_BLOCKS = (
    ["encoder"]
    + [f"diffusion_model_input_blocks_{i}_" for i in range(12)]
    + ["diffusion_model_middle_block_"]
    + [f"diffusion_model_output_blocks_{i}_" for i in range(12)]
    + ["embedders", "transformer_resblocks"]
)
LBW_ID26 = ["BASE"] + [f"IN{i:02d}" for i in range(12)] + ["M00"] + [f"OUT{i:02d}" for i in range(12)]


def lbw_block(key):
    """LBW's ratiodealer: the last BLOCKS entry contained in the key; None when none is (ratio 1)."""
    found = None
    for i, b in enumerate(LBW_BLOCKS):
        if b in key:
            found = LBW_ID26[0 if i >= 26 else i]
    return found


SD1_LAYOUT = UNetLayout.from_config(
    {
        "down_block_types": ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
        "up_block_types": ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3,
        "layers_per_block": 2,
    }
)
SDXL_LAYOUT = UNetLayout.from_config(
    {
        "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
        "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
        "layers_per_block": 2,
    }
)


def _rows(text):
    """Table rows typed as text, three words a row (a long row wraps onto a second line): our module,
    A1111's key for it, LBW's block ('-': none, ratio 1)."""
    w = text.split()
    return [(c, k, None if b == "-" else b) for c, k, b in zip(w[::3], w[1::3], w[2::3], strict=True)]


# (our canonical module, A1111's network key for it, LBW's block)
SD1_TABLE = _rows(
    """
text_encoder.text_model.encoder.layers.0.self_attn.q_proj
    transformer_text_model_encoder_layers_0_self_attn_q_proj  BASE
text_encoder.text_model.encoder.layers.11.mlp.fc2  transformer_text_model_encoder_layers_11_mlp_fc2  BASE
unet.conv_in  diffusion_model_input_blocks_0_0  IN00
unet.down_blocks.0.resnets.0.conv1  diffusion_model_input_blocks_1_0_in_layers_2  IN01
unet.down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k
    diffusion_model_input_blocks_1_1_transformer_blocks_0_attn2_to_k  IN01
unet.down_blocks.0.attentions.1.proj_in  diffusion_model_input_blocks_2_1_proj_in  IN02
unet.down_blocks.0.downsamplers.0.conv  diffusion_model_input_blocks_3_0_op  IN03
unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q
    diffusion_model_input_blocks_4_1_transformer_blocks_0_attn1_to_q  IN04
unet.down_blocks.1.attentions.1.transformer_blocks.0.ff.net.2
    diffusion_model_input_blocks_5_1_transformer_blocks_0_ff_net_2  IN05
unet.down_blocks.1.downsamplers.0.conv  diffusion_model_input_blocks_6_0_op  IN06
unet.down_blocks.2.attentions.0.proj_out  diffusion_model_input_blocks_7_1_proj_out  IN07
unet.down_blocks.2.attentions.1.transformer_blocks.0.attn2.to_v
    diffusion_model_input_blocks_8_1_transformer_blocks_0_attn2_to_v  IN08
unet.down_blocks.2.downsamplers.0.conv  diffusion_model_input_blocks_9_0_op  IN09
unet.down_blocks.3.resnets.0.conv2  diffusion_model_input_blocks_10_0_out_layers_3  IN10
unet.down_blocks.3.resnets.1.conv1  diffusion_model_input_blocks_11_0_in_layers_2  IN11
unet.mid_block.resnets.0.conv1  diffusion_model_middle_block_0_in_layers_2  M00
unet.mid_block.attentions.0.transformer_blocks.0.attn2.to_out.0
    diffusion_model_middle_block_1_transformer_blocks_0_attn2_to_out_0  M00
unet.mid_block.resnets.1.conv2  diffusion_model_middle_block_2_out_layers_3  M00
unet.up_blocks.0.resnets.0.conv1  diffusion_model_output_blocks_0_0_in_layers_2  OUT00
unet.up_blocks.0.resnets.1.conv1  diffusion_model_output_blocks_1_0_in_layers_2  OUT01
unet.up_blocks.0.upsamplers.0.conv  diffusion_model_output_blocks_2_1_conv  OUT02
unet.up_blocks.1.attentions.0.proj_in  diffusion_model_output_blocks_3_1_proj_in  OUT03
unet.up_blocks.1.attentions.1.transformer_blocks.0.attn1.to_k
    diffusion_model_output_blocks_4_1_transformer_blocks_0_attn1_to_k  OUT04
unet.up_blocks.1.upsamplers.0.conv  diffusion_model_output_blocks_5_2_conv  OUT05
unet.up_blocks.2.attentions.0.transformer_blocks.0.attn2.to_q
    diffusion_model_output_blocks_6_1_transformer_blocks_0_attn2_to_q  OUT06
unet.up_blocks.2.attentions.2.proj_out  diffusion_model_output_blocks_8_1_proj_out  OUT08
unet.up_blocks.3.attentions.0.proj_in  diffusion_model_output_blocks_9_1_proj_in  OUT09
unet.up_blocks.3.resnets.1.conv_shortcut  diffusion_model_output_blocks_10_0_skip_connection  OUT10
unet.up_blocks.3.attentions.2.transformer_blocks.0.ff.net.0.proj
    diffusion_model_output_blocks_11_1_transformer_blocks_0_ff_net_0_proj  OUT11
unet.time_embedding.linear_1  diffusion_model_time_embed_0  -
unet.conv_out  diffusion_model_out_2  -
"""
)
SDXL_TABLE = _rows(
    """
text_encoder.text_model.encoder.layers.3.self_attn.k_proj
    0_transformer_text_model_encoder_layers_3_self_attn_k_proj  BASE
text_encoder_2.text_model.encoder.layers.30.mlp.fc1  1_model_transformer_resblocks_30_mlp_c_fc  BASE
unet.conv_in  diffusion_model_input_blocks_0_0  IN00
unet.down_blocks.0.resnets.1.conv2  diffusion_model_input_blocks_2_0_out_layers_3  IN02
unet.down_blocks.0.downsamplers.0.conv  diffusion_model_input_blocks_3_0_op  IN03
unet.down_blocks.1.attentions.0.transformer_blocks.1.attn1.to_q
    diffusion_model_input_blocks_4_1_transformer_blocks_1_attn1_to_q  IN04
unet.down_blocks.1.attentions.1.proj_in  diffusion_model_input_blocks_5_1_proj_in  IN05
unet.down_blocks.1.downsamplers.0.conv  diffusion_model_input_blocks_6_0_op  IN06
unet.down_blocks.2.attentions.0.transformer_blocks.9.attn2.to_k
    diffusion_model_input_blocks_7_1_transformer_blocks_9_attn2_to_k  IN07
unet.down_blocks.2.attentions.1.proj_out  diffusion_model_input_blocks_8_1_proj_out  IN08
unet.mid_block.attentions.0.transformer_blocks.5.ff.net.2
    diffusion_model_middle_block_1_transformer_blocks_5_ff_net_2  M00
unet.up_blocks.0.attentions.0.transformer_blocks.0.attn2.to_v
    diffusion_model_output_blocks_0_1_transformer_blocks_0_attn2_to_v  OUT00
unet.up_blocks.0.attentions.2.proj_in  diffusion_model_output_blocks_2_1_proj_in  OUT02
unet.up_blocks.0.upsamplers.0.conv  diffusion_model_output_blocks_2_2_conv  OUT02
unet.up_blocks.1.attentions.1.transformer_blocks.1.attn1.to_out.0
    diffusion_model_output_blocks_4_1_transformer_blocks_1_attn1_to_out_0  OUT04
unet.up_blocks.1.upsamplers.0.conv  diffusion_model_output_blocks_5_2_conv  OUT05
unet.up_blocks.2.resnets.0.conv1  diffusion_model_output_blocks_6_0_in_layers_2  OUT06
unet.up_blocks.2.resnets.2.conv2  diffusion_model_output_blocks_8_0_out_layers_3  OUT08
unet.add_embedding.linear_1  diffusion_model_label_emb_0_0  -
unet.time_embedding.linear_2  diffusion_model_time_embed_2  -
"""
)


# SD2: the SD1 UNet rows; its OpenCLIP-H encoder is keyed like OpenCLIP in A1111
SD2_TABLE = [r for r in SD1_TABLE if r[0].startswith("unet.")] + _rows(
    """
text_encoder.text_model.encoder.layers.22.self_attn.out_proj  model_transformer_resblocks_22_attn_out_proj  BASE
text_encoder.text_model.encoder.layers.0.mlp.fc2  model_transformer_resblocks_0_mlp_c_proj  BASE
"""
)


@pytest.mark.parametrize(
    "family,layout,rows",
    [("sd1", SD1_LAYOUT, SD1_TABLE), ("sd2", SD1_LAYOUT, SD2_TABLE), ("sdxl", SDXL_LAYOUT, SDXL_TABLE)],
)
def test_module_blocks_match_lbw(family, layout, rows):
    t = bwm.table(family)
    for canon, key, block in rows:
        assert lbw_block(key) == block, key  # the typed table agrees with LBW's rule
        assert t.block_of(canon, layout) == block, canon
        if block is not None:
            assert block in t.ids


def test_vectors_and_presets_by_hand():
    w = bwm.parse("OUTALL", "sd1").weights
    assert w["BASE"] == 1 and w["IN01"] == 0 and w["IN08"] == 0 and w["M00"] == 0
    assert all(w[f"OUT{i:02d}"] == 1 for i in range(3, 12))
    assert w["IN00"] == w["IN03"] == w["OUT00"] == w["OUT02"] == 0  # not in the 17: 0, as LBW's to26
    v26 = ",".join(str(i) for i in range(26))
    w = bwm.parse(v26, "sd2").weights
    assert [w[b] for b in LBW_ID26] == list(range(26))
    w = bwm.parse("1,2,3,4,5,6,7,8,9,10,11,12", "sdxl").weights
    assert (w["BASE"], w["IN04"], w["IN08"], w["M00"], w["OUT00"], w["OUT05"]) == (1, 2, 5, 6, 7, 12)
    assert w["IN00"] == w["IN03"] == w["OUT06"] == w["OUT08"] == 0
    w = bwm.parse(",".join(str(i) for i in range(20)), "sdxl").weights
    assert (w["BASE"], w["IN00"], w["IN08"], w["M00"], w["OUT00"], w["OUT08"]) == (0, 1, 9, 10, 11, 19)
    # LBW's 17-value presets on SDXL: by block id (OUT00-OUT02 not named -> 0; OUT09-11 do not exist)
    w = bwm.parse("outall", "sdxl").weights
    assert w["BASE"] == 1 and w["OUT03"] == w["OUT08"] == 1 and w["OUT00"] == w["OUT02"] == 0 and w["IN04"] == 0
    assert set(w) == set(bwm.BLOCKID20)
    assert bwm.parse("", "sd1") is None and bwm.parse(None, "sdxl") is None
    ones17 = bwm.parse(" 1, 1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1 ", "sd1")
    assert not ones17.is_identity() and ones17.weights["IN00"] == 0 and ones17.weights["OUT11"] == 1
    assert bwm.parse(",".join(["1"] * 26), "sd1").is_identity()


def test_bad_vectors_name_lengths_and_blocks():
    with pytest.raises(WeightsmithError, match=r"12 value.*SD1 takes 17 or 26.*BASE,IN01,IN02"):
        bwm.parse("1,1,1,1,1,1,1,1,1,1,1,1", "sd1")
    with pytest.raises(WeightsmithError, match=r"17 value.*SDXL takes 12 or 20.*BASE,IN04,IN05,IN07,IN08,M00"):
        bwm.parse(",".join(["1"] * 17), "sdxl")
    with pytest.raises(WeightsmithError, match=r"'R' is neither a number nor a preset.*OUTALL"):
        bwm.parse("1,R,1", "sd1")
    with pytest.raises(WeightsmithError, match="finite"):
        bwm.parse(",".join(["nan"] * 17), "sd1")
    with pytest.raises(WeightsmithError, match=r"17 value.*FLUX takes 61.*CLIP,T5,IN,D00.*FLUXALL"):
        bwm.parse("ALL", "flux")  # LBW applies only its 61-value vectors to Flux
    with pytest.raises(WeightsmithError, match=r"61 value.*SD1 takes 17 or 26"):
        bwm.parse("FLUXALL", "sd1")
    with pytest.raises(WeightsmithError, match="not defined for the 'sd3'"):
        bwm.parse("ALL", "sd3")


def test_user_presets_in_lbw_format():
    p = bwm.parse_presets(
        "MINE:1,1,0,0,0,0,0,0,0,0,0,0,0,0,0,1,1\n# comment:1,2\nXL:" + ",".join(["0.5"] * 12) + "\nnot a preset line\n"
    )
    assert set(p) == {"MINE", "XL"}
    assert bwm.parse("MINE", "sd1", p).weights["OUT11"] == 1
    assert bwm.parse("XL", "sdxl", p).weights["OUT05"] == 0.5


# -- applied to LoRAs and merges --------------------------------------------------------------------
def _dense(raw, lora, model):
    """ΔW per module straight from the kohya tensors (alpha / r · up @ down)."""
    out = {}
    for n in lora.modules:
        p = kohya_prefix(n, model.family, model.layout)
        r = raw[p + ".lora_down.weight"].shape[0]
        up = raw[p + ".lora_up.weight"].double().reshape(raw[p + ".lora_up.weight"].shape[0], -1)
        down = raw[p + ".lora_down.weight"].double().reshape(r, -1)
        out[n] = float(raw[p + ".alpha"]) / r * up @ down
    return out


def _hand_weight(name, model, vec_ids, vals):
    """The block weight of a module by hand: its LDM path's block number read off the kohya key."""
    p = kohya_prefix(name, model.family, model.layout)
    if not name.startswith("unet."):
        return dict(zip(vec_ids, vals)).get("BASE", 0.0)
    ldm = model.layout.to_ldm(name[5:])
    head = ldm.split(".")
    if head[0] == "middle_block":
        b = "M00"
    elif head[0] in ("input_blocks", "output_blocks"):
        b = ("IN" if head[0] == "input_blocks" else "OUT") + f"{int(head[1]):02d}"
    else:
        return 1.0
    assert p  # the key exists
    return dict(zip(vec_ids, vals)).get(b, 0.0)


@pytest.fixture(scope="module")
def pair(tiny_models):
    model = tiny_models["sd1"]
    raw = [random_lora(model, groups=("attn", "te", "conv"), rank=r, seed=s) for s, r in ((3, 4), (4, 2))]
    loras = [lora_from_state_dict(t, model, metadata=m, name=f"l{i}") for i, (t, m) in enumerate(raw)]
    return model, raw, loras


VEC_A = "0.5,0,0,0,0,0,0,0,1,1,1,1,1,1,1,1,1"
VEC_B = "1,0.25,0.75,1,1,1,1,2,0,0,0,0,0,0,0,0,0"


def _floats(s):
    return [float(x) for x in s.split(",")]


def test_block_weighted_linear_merge_is_hand_scaled_sum(pair):
    model, raw, loras = pair
    w = [0.7, 1.3]
    e = merge(model, loras, "linear", weights=w, blocks=[VEC_A, VEC_B])
    dense = [_dense(t, l, model) for (t, _), l in zip(raw, loras)]
    names = set(dense[0]) | set(dense[1])
    checked_zero = 0
    for n in names:
        exp = sum(
            wi * _hand_weight(n, model, bwm.BLOCKID17, _floats(v)) * d[n]
            for wi, v, d in zip(w, (VEC_A, VEC_B), dense)
            if n in d
        )
        if n not in e.deltas:
            assert float(exp.norm()) == 0
            checked_zero += 1
            continue
        got = e.deltas[n].double().reshape(exp.shape)
        assert float((got - exp).norm()) <= 1e-5 * max(float(exp.norm()), 1e-12), n
    assert checked_zero > 0  # some modules are 0 in both vectors and absent from the merge
    rows = {d["name"]: d["blocks"] for d in e.report["loras"]}
    assert rows["l0"]["spec"] == VEC_A
    got = {b["block"]: b["weight"] for b in rows["l1"]["blocks"]}
    assert got["BASE"] == 1 and got["IN01"] == 0.25 and got["M00"] == 2 and got.get("OUT03", 0) == 0
    assert loras[0].modules and all(m.scale == loras[0].modules[n].scale for n, m in loras[0].modules.items())


@pytest.mark.parametrize("method", ["concat", "svd", "ties", "dare", "regmean", "iteris"])
def test_every_method_sees_the_block_weighted_loras(pair, method):
    """Block weights then a method == the method on LoRA files already scaled by hand."""
    model, raw, loras = pair
    scaled = []
    for (t, m), l, v in zip(raw, loras, (VEC_A, VEC_B)):
        t2 = dict(t)
        for n in l.modules:
            p = kohya_prefix(n, model.family, model.layout)
            wt = _hand_weight(n, model, bwm.BLOCKID17, _floats(v))
            if wt == 0:
                for suf in (".lora_up.weight", ".lora_down.weight", ".alpha"):
                    t2.pop(p + suf)
            else:
                t2[p + ".lora_up.weight"] = (t[p + ".lora_up.weight"].double() * wt).float()
        scaled.append(lora_from_state_dict(t2, model, metadata=m, name=l.name))
    opts = MergeOptions(iterations=1, samples=1, steps=1, latent_size=8, batch_size=1, svd_rank=3)
    a = merge(
        model, loras, method, weights=[1.0, 0.5], blocks=[VEC_A, VEC_B], options=opts, prompts=[["a cat"], ["a dog"]]
    )
    b = merge(model, scaled, method, weights=[1.0, 0.5], options=opts, prompts=[["a cat"], ["a dog"]])
    assert set(a.deltas) == set(b.deltas)
    for n in a.deltas:
        x, y = a.deltas[n].double(), b.deltas[n].double()
        assert float((x - y).norm()) <= 1e-4 * max(float(y.norm()), 1e-8), (method, n)


def test_merge_refuses_a_vector_of_the_wrong_length(pair):
    model, _, loras = pair
    with pytest.raises(WeightsmithError, match=r"LoRA l1: block weights .* SD1 takes 17 or 26"):
        merge(model, loras, "linear", blocks=["", "1,1,1,1,1,1,1,1,1,1,1,1"])
    with pytest.raises(WeightsmithError, match="every module of LoRA l0 weight 0"):
        merge(model, loras, "linear", blocks=["NONE", ""])


def test_sdxl_linear_merge_by_hand(tiny_models):
    model = tiny_models["sdxl"]
    t, m = random_lora(model, groups=("attn", "te", "conv"), rank=3, seed=5)
    lora = lora_from_state_dict(t, model, metadata=m, name="x")
    vec = "0.5,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15,16,17,18,19"
    e = merge(model, [lora], "linear", blocks=[vec])
    dense = _dense(t, lora, model)
    vals = _floats(vec)
    for n, d in dense.items():
        wt = _hand_weight(n, model, bwm.BLOCKID20, vals)
        if wt == 0:
            assert n not in e.deltas
        else:
            assert float((e.deltas[n].double().reshape(d.shape) - wt * d).norm()) <= 1e-5 * float(d.norm()), n
    assert any(n.startswith("text_encoder_2.") for n in e.deltas)


# -- the CLI: merge and reweight ---------------------------------------------------------------------
def test_parse_lora_spec(tmp_path):
    from weightsmith.core.merge.cli import parse_lora_spec

    assert parse_lora_spec("a.safetensors:0.5:OUTALL") == ("a.safetensors", 0.5, "OUTALL")
    assert parse_lora_spec("a.safetensors:OUTALL") == ("a.safetensors", 1.0, "OUTALL")
    assert parse_lora_spec("C:\\l\\a.safetensors:0.8:" + VEC_A) == ("C:\\l\\a.safetensors", 0.8, VEC_A)
    assert parse_lora_spec("C:\\l\\a.safetensors") == ("C:\\l\\a.safetensors", 1.0, None)
    assert parse_lora_spec("a.safetensors:0.5") == ("a.safetensors", 0.5, None)
    assert parse_lora_spec("a.safetensors:MINE", {"MINE": (1,) * 17}) == ("a.safetensors", 1.0, "MINE")


@pytest.fixture(scope="module")
def files(tiny_checkpoints, tiny_models, tmp_path_factory, tokenizer_dir):
    from safetensors.torch import save_file

    d = tmp_path_factory.mktemp("bw")
    model = tiny_models["sd1"]
    paths = []
    for s, r in ((7, 4), (8, 2)):
        t, m = random_lora(model, groups=("attn", "te", "conv"), rank=r, seed=s)
        p = d / f"l{s}.safetensors"
        save_file(t, str(p), m)
        paths.append(p)
    return tiny_checkpoints["sd1"], paths, d, tokenizer_dir


def test_cli_reweight_is_weight_times_delta(files):
    from weightsmith.core.cli import main
    from weightsmith.core.model_io import load_model

    ckpt, (a, _), d, tok = files
    out = d / "a_out.safetensors"

    def reweight(blocks, out, *more):
        argv = ["lora", "reweight", str(a), "--model", str(ckpt), "--tokenizer", str(tok), "--blocks", blocks]
        return main([*argv, *more, "--out", str(out)])

    rc = reweight(VEC_B, out, "--weight", "0.5")
    assert rc == 0 and out.exists()
    model = load_model(ckpt, tokenizer=tok)
    raw = load_file(str(a))
    src = load_lora(a, model)
    dense = _dense(raw, src, model)
    got = load_lora(out, model)
    written = load_file(str(out))
    vals = _floats(VEC_B)
    for n, dd in dense.items():
        wt = 0.5 * _hand_weight(n, model, bwm.BLOCKID17, vals)
        if wt == 0:  # weight 0: dropped from the file
            assert n not in got.modules
            assert not any(k.startswith(kohya_prefix(n, "sd1", model.layout) + ".") for k in written)
            continue
        assert float((got.modules[n].delta(torch.float64).reshape(dd.shape) - wt * dd).norm()) <= 1e-6 * float(
            dd.norm()
        ), n
    assert set(got.modules) < set(src.modules)
    # the input is untouched and the output is refused over it
    assert reweight("ALL", a) == 2
    assert reweight("1,1,1", d / "bad.safetensors") == 2
    assert not (d / "bad.safetensors").exists()


def test_cli_merge_with_blocks_equals_core(files, capsys):
    import json

    from weightsmith.core.cli import main
    from weightsmith.core.model_io import load_model

    ckpt, (a, b), d, tok = files
    out, rep = d / "m.safetensors", d / "m.json"
    rc = main(
        [
            "merge",
            "--model",
            str(ckpt),
            "--tokenizer",
            str(tok),
            "--method",
            "linear",
            "--lora",
            f"{a}:0.7:OUTALL",
            "--lora",
            f"{b}:{VEC_B}",
            "--out",
            str(out),
            "--report",
            str(rep),
            "--no-progress",
        ]
    )
    assert rc == 0
    printed = capsys.readouterr().out
    assert "block weights: " + a.stem + " [OUTALL]: BASE 1" in printed
    model = load_model(ckpt, tokenizer=tok)
    ref = merge(
        model, [load_lora(a, model), load_lora(b, model)], "linear", weights=[0.7, 1.0], blocks=["OUTALL", VEC_B]
    )
    got = load_lora(out, model)
    assert set(got.modules) == set(ref.deltas)
    for n, dd in ref.deltas.items():
        assert float((got.modules[n].delta(torch.float64) - dd.double()).norm()) <= 1e-5 * float(dd.norm())
    r = json.loads(rep.read_text())
    assert r["loras"][0]["blocks"]["spec"] == "OUTALL"
    from safetensors import safe_open

    with safe_open(str(out), "pt") as f:
        assert json.loads(f.metadata()["ws_blocks"]) == {a.stem: "OUTALL", b.stem: VEC_B}


# -- one string, one result: CLI, ComfyUI node, A1111/Forge tab --------------------------------------
def test_same_string_same_merge_in_cli_node_and_tab(tmp_path, monkeypatch):
    import sys
    import types
    from pathlib import Path

    from safetensors.torch import save_file

    sys.path.insert(0, str(Path(__file__).resolve().parent / "a1111"))
    from helpers import tiny_diffusers_folder

    from weightsmith.a1111_extension.backend import StandaloneBackend, Workbench
    from weightsmith.core.cli import main
    from weightsmith.nodes import comfy_adapter as ca
    from weightsmith.nodes import merge_nodes

    src = tiny_diffusers_folder(tmp_path / "model", "sd1", seed=7)
    (tmp_path / "loras").mkdir()
    backend = StandaloneBackend(src, tmp_path / "loras", tmp_path / "ckpts")
    model = backend.model()
    paths = []
    for s, r in ((21, 3), (22, 2)):
        t, m = random_lora(model, groups=("attn", "te", "conv"), rank=r, seed=s)
        p = tmp_path / "loras" / f"r{s}.safetensors"
        save_file(t, str(p), m)
        paths.append(p)
    a, b = paths
    # the tab: one line per LoRA
    edit_tab, _ = Workbench(backend).compute_merge(
        [a.name, b.name], "0.7, 1", "", "linear", {}, blocks=f"OUTALL\n{VEC_B}"
    )
    # the CLI
    out = tmp_path / "cli.safetensors"
    assert (
        main(
            [
                "merge",
                "--model",
                str(src),
                "--method",
                "linear",
                "--lora",
                f"{a}:0.7:OUTALL",
                "--lora",
                f"{b}:1:{VEC_B}",
                "--out",
                str(out),
                "--no-progress",
            ]
        )
        == 0
    )
    cli = load_lora(out, model)
    # the ComfyUI nodes, without ComfyUI: its folder list and the model adapter stand in
    fp = types.ModuleType("folder_paths")
    fp.get_full_path_or_raise = lambda kind, name: str(tmp_path / "loras" / name)
    monkeypatch.setitem(sys.modules, "folder_paths", fp)
    monkeypatch.setattr(merge_nodes, "host_progress", lambda *a: (None, lambda: False))
    monkeypatch.setattr(ca, "sdmodel_from_comfy", lambda m, c, **k: model)
    monkeypatch.setattr(ca, "to_compute_device", lambda *a, **k: "cpu")
    monkeypatch.setattr(ca, "apply_edit", lambda m, c, e, s: (m, c))
    monkeypatch.setattr(ca, "weight_norms", lambda sd, e: {n: 1.0 for n in e.deltas})
    stack = merge_nodes.WeightsmithLoraStack()
    (st,) = stack.run(a.name, 0.7, "", None, block_preset="OUTALL", block_weights="")
    (st,) = stack.run(b.name, 1.0, "", st, block_preset="INS", block_weights=VEC_B)  # the text wins
    res = merge_nodes.WeightsmithIterISMerge().run("M", "C", st, "linear", 1, 1, 1, 64, 0)
    edit_node, text = res["result"][2], res["result"][3]
    assert "block weights: r21 [OUTALL]: BASE 1, IN01 0" in text
    assert f"[{VEC_B}]: BASE 1, IN01 0.25" in text
    assert set(edit_tab.deltas) == set(edit_node.deltas) == set(cli.modules)
    for n, d in edit_tab.deltas.items():
        ref = d.double()
        assert torch.equal(edit_node.deltas[n], d), n
        assert float((cli.modules[n].delta(torch.float64).reshape(ref.shape) - ref).norm()) <= 1e-5 * float(ref.norm())


def test_host_field_rules():
    assert bwm.host_spec("OUTALL", "") == "OUTALL" and bwm.host_spec("none", "  ") is None
    assert bwm.host_spec("INS", VEC_A) == VEC_A  # the text wins over the dropdown
    assert bwm.per_lora("", 3) is None and bwm.per_lora("\n\n", 2) is None
    assert bwm.per_lora("OUTALL", 3) == ["OUTALL"] * 3  # one line for all
    assert bwm.per_lora(f"{VEC_A}\n\nINS", 3) == [VEC_A, None, "INS"]
    assert bwm.per_lora(f"{VEC_A}\nnone", 2) == [VEC_A, None]
    with pytest.raises(WeightsmithError, match="2 lines for 3 LoRAs"):
        bwm.per_lora("ALL\nINS", 3)
    assert bwm.PRESET_CHOICES[0] == "none" and set(bwm.PRESET_CHOICES[1:]) == set(bwm.PRESETS)
