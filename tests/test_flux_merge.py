"""Merging Flux.1 LoRAs with the data-free methods (docs/flux_lora.md, "Merging Flux LoRAs").

Two LoRAs for a seeded tiny random Flux in different layouts and over different modules: ``A`` in
kohya-Flux layout (fused BFL names, ``.alpha``) over every transformer layer plus CLIP-L and T5
layers, ``B`` in diffusers/PEFT layout (split q/k/v names) over part of the transformer only. Every
ΔW is known here from the factors the test drew (its own name tables and row splits, not
Weightsmith's), so each merge is checked against the weighted sum computed here, and the written
files against the base weights plus that sum: the LoRA read back, diffusers' ``FluxPipeline``
loading it, the T5 file beside it, and the merged checkpoint's stored (fused) tensors.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from flux_tables import SWAPPED, swap, table  # tests/flux_tables.py: the tests' own name tables
from safetensors.torch import load_file, save_file

from weightsmith.core.errors import WeightsmithError
from weightsmith.core.lora_read import load_lora

CLIP_SUBS = ["self_attn.q_proj", "self_attn.v_proj", "mlp.fc1"]
T5_SUBS = ["layer.0.SelfAttention.q", "layer.1.DenseReluDense.wo"]
METHODS = ["linear", "concat", "svd", "ties", "dare"]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    from weightsmith.core.flux_io import load_flux
    from weightsmith.core.lab.random_models import build_random_flux, write_random_flux

    rf = build_random_flux(0)
    root = tmp_path_factory.mktemp("fluxmerge")
    path, tes = write_random_flux(rf, root / "bfl", "bfl")
    shapes = {n: tuple(m.weight.shape) for n, m in rf.transformer.named_modules() if isinstance(m, torch.nn.Linear)}
    cfg = rf.transformer.config
    tab = table(cfg.num_layers, cfg.num_single_layers)
    g = torch.Generator().manual_seed(7)

    def pair(out, inn, r):
        return torch.randn(out, r, generator=g) * 0.2, torch.randn(r, inn, generator=g) * 0.2

    truth_a, truth_b, a, b = {}, {}, {}, {}
    for i, (bfl, ds) in enumerate(tab.items()):  # A: kohya, every transformer layer, alpha = r/2
        rows = sum(shapes[d][0] for d in ds)
        up, down = pair(rows, shapes[ds[0]][1], 1 + i % 3)
        r = down.shape[0]
        pre = "lora_unet_" + bfl.replace(".", "_")
        a[pre + ".lora_up.weight"], a[pre + ".lora_down.weight"] = up * 2.0, down
        a[pre + ".alpha"] = torch.tensor(r / 2.0)
        up_d = swap(up) if bfl == SWAPPED else up
        start = 0
        for d in ds:
            n = shapes[d][0]
            truth_a["transformer." + d] = up_d[start : start + n].double() @ down.double()
            start += n
    clip_sd, t5_sd = rf.clip.state_dict(), rf.t5.state_dict()
    for layer in range(rf.clip.config.num_hidden_layers):
        for s in CLIP_SUBS:
            p = f"encoder.layers.{layer}.{s}"
            key = next(k for k in clip_sd if k.endswith(p + ".weight"))  # with or without text_model.
            up, down = pair(*clip_sd[key].shape, 2)
            pre = "lora_te1_text_model_" + p.replace(".", "_")
            a[pre + ".lora_up.weight"], a[pre + ".lora_down.weight"] = up, down
            a[pre + ".alpha"] = torch.tensor(2.0)
            truth_a["text_encoder.text_model." + p] = up.double() @ down.double()
    for layer in range(2):
        for s in T5_SUBS:
            p = f"encoder.block.{layer}.{s}"
            up, down = pair(*t5_sd[p + ".weight"].shape, 1)
            pre = "lora_te3_" + p.replace(".", "_")
            a[pre + ".lora_up.weight"], a[pre + ".lora_down.weight"] = up, down
            a[pre + ".alpha"] = torch.tensor(1.0)
            truth_a["text_encoder_2." + p] = up.double() @ down.double()
    # B: diffusers/PEFT, split names, part of the transformer (some pieces of fused layers only)
    some = [n for n in shapes if re.search(r"to_q$|to_k$|add_v_proj|proj_mlp|context_embedder|norm_out|ff\.net\.2", n)]
    for i, n in enumerate(sorted(some)):
        up, down = pair(shapes[n][0], shapes[n][1], 2 + i % 2)
        b[f"transformer.{n}.lora_A.weight"], b[f"transformer.{n}.lora_B.weight"] = down, up
        truth_b["transformer." + n] = up.double() @ down.double()
    save_file({k: v.contiguous() for k, v in a.items()}, str(root / "a_kohya.safetensors"))
    save_file({k: v.contiguous() for k, v in b.items()}, str(root / "b_peft.safetensors"))
    return {
        "rf": rf,
        "path": path,
        "tes": tes,
        "model": load_flux(path, tes),
        "tab": tab,
        "shapes": shapes,
        "truth": (truth_a, truth_b),
        "loras": (root / "a_kohya.safetensors", root / "b_peft.safetensors"),
        "root": root,
    }


W = (1.0, 0.5)


def weighted_sum(world, weights=W) -> dict:
    out = {}
    for t, w in zip(world["truth"], weights):
        for n, d in t.items():
            out[n] = out.get(n, 0) + w * d
    return out


def _rel(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm())


def _merge(world, method):
    from weightsmith.core.lora_read import load_lora
    from weightsmith.core.merge import merge

    loras = [load_lora(p, world["model"]) for p in world["loras"]]
    return merge(world["model"], loras, method, weights=list(W)), loras


@pytest.mark.parametrize("method", ["linear", "concat"])
def test_linear_and_concat_are_the_weighted_sum_of_mixed_layouts(world, method):
    edit, loras = _merge(world, method)
    want = weighted_sum(world)
    assert set(edit.deltas) == set(want)
    worst = max(_rel(edit.deltas[n], want[n]) for n in want)
    assert worst <= 1e-6, worst
    if method == "concat":  # exact factors of rank r_A + r_B where both LoRAs change a module
        a, b = (l.modules for l in loras)
        for n, (up, _) in edit.factors.items():
            assert up.shape[1] == (a[n].rank if n in a else 0) + (b[n].rank if n in b else 0), n


@pytest.mark.parametrize("method", METHODS)
def test_every_data_free_method_runs_on_flux_and_its_lora_reads_back(world, method, tmp_path):
    """Each method's file (transformer and CLIP-L parts as a LoRA, T5 as a T5 file beside it) holds the
    merge: read back, ΔW = the edit's (rel. ≤ 1e-5; SVD within its reported error)."""
    from weightsmith.core.lora_read import load_lora
    from weightsmith.core.merge import save_merge

    edit, loras = _merge(world, method)
    out = tmp_path / f"{method}.safetensors"
    info = save_merge(edit, world["model"], out, loras=loras)
    back = load_lora(out, world["model"])
    lora_part = {n for n in edit.deltas if not n.startswith("text_encoder_2.")}
    assert set(back.modules) == lora_part
    worst = max(_rel(back.modules[n].delta(torch.float64), edit.deltas[n]) for n in lora_part)
    assert worst <= 1e-5 + info["max_error"], (worst, info["max_error"])
    t5 = load_file(info["t5_file"])
    base = world["rf"].t5.state_dict()
    for n in [n for n in edit.deltas if n.startswith("text_encoder_2.")]:
        key = n.removeprefix("text_encoder_2.") + ".weight"
        assert _rel(t5[key].double() - base[key].double(), edit.deltas[n]) <= 1e-6, n
    if method == "svd":  # every module's truncation error is in the report once merge() returns
        errs = edit.report["svd_errors"]
        assert set(errs) == set(edit.deltas) and all(0 <= e < 1 for e in errs.values())


def test_the_cli_merge_loads_exactly_in_diffusers(world, tmp_path, capsys):
    """``weightsmith merge --model flux1-dev.safetensors --text-encoder … --method concat``: the LoRA through
    ``FluxPipeline.load_lora_weights`` + ``fuse_lora`` gives base + Σ wᵢΔWᵢ on every transformer and CLIP-L
    module (rel. ≤ 1e-5) and changes nothing else; the T5 file beside it is base T5 + its ΔW."""
    import copy

    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline

    from weightsmith.core.cli import main

    out = tmp_path / "merged.safetensors"
    a, b = world["loras"]
    te = [x for t in world["tes"] for x in ("--text-encoder", str(t))]
    rc = main(["merge", "--model", str(world["path"]), *te, "--lora", str(a), "--lora", f"{b}:{W[1]}",
               "--method", "concat", "--out", str(out), "--no-progress"])  # fmt: skip
    printed = capsys.readouterr()
    assert rc == 0, printed.err
    assert "_t5xxl.safetensors" in printed.out and "T5" in printed.out
    want = weighted_sum(world)
    rf = world["rf"]
    tr, clip = copy.deepcopy(rf.transformer), copy.deepcopy(rf.clip)
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, block_out_channels=(4,), layers_per_block=1, latent_channels=1, norm_num_groups=1
    )
    pipe = FluxPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(),
        vae=vae,
        text_encoder=clip,
        tokenizer=None,
        text_encoder_2=copy.deepcopy(rf.t5),
        tokenizer_2=None,
        transformer=tr,
    )
    base_t = {k: v.detach().clone() for k, v in tr.state_dict().items()}
    base_c = {k: v.detach().clone() for k, v in clip.state_dict().items()}
    pipe.load_lora_weights(str(out))
    pipe.fuse_lora(components=["transformer", "text_encoder"])
    pipe.unload_lora_weights()
    worst, n = 0.0, 0
    clip_names = {k: "text_encoder.text_model." + k.removeprefix("text_model.") for k in base_c}  # transformers 4/5
    for prefix, base, got in (("transformer.", base_t, tr.state_dict()), ("", base_c, clip.state_dict())):
        for k, v in base.items():
            name = (prefix + k if prefix else clip_names[k]).removesuffix(".weight")
            if k.endswith(".weight") and name in want:
                worst = max(worst, _rel(got[k].double() - v.double(), want[name]))
                n += 1
            else:
                assert torch.equal(got[k], v), k
    assert n == len([k for k in want if not k.startswith("text_encoder_2.")])
    assert worst <= 1e-5, worst
    t5 = load_file(str(out.with_name("merged_t5xxl.safetensors")))
    base5 = rf.t5.state_dict()
    for k, v in base5.items():
        name = "text_encoder_2." + k.removesuffix(".weight")
        if name in want:
            assert _rel(t5[k].double() - v.double(), want[name]) <= 1e-6, k
        elif k in t5:
            assert torch.equal(t5[k], v.to(t5[k].dtype)), k


def test_the_merged_checkpoint_holds_the_sum_in_its_fused_tensors(world, tmp_path, capsys):
    """``--format checkpoint`` on a BFL transformer file: every stored tensor = base + the sum, the fused
    ``qkv``/``linear1`` tensors row by row and ``final_layer.adaLN_modulation.1`` in BFL's (shift, scale)
    order (this test's own table); every other tensor unchanged; the text-encoder files beside it."""
    from weightsmith.core.cli import main

    out = tmp_path / "merged.safetensors"
    a, b = world["loras"]
    te = [x for t in world["tes"] for x in ("--text-encoder", str(t))]
    rc = main(["merge", "--model", str(world["path"]), *te, "--lora", str(a), "--lora", f"{b}:{W[1]}",
               "--method", "linear", "--format", "checkpoint", "--out", str(out), "--no-progress"])  # fmt: skip
    assert rc == 0, capsys.readouterr().err
    want = weighted_sum(world)
    base, got = load_file(str(world["path"])), load_file(str(out))
    assert set(base) == set(got)
    changed = 0
    for k, v in base.items():
        bfl = k.removesuffix(".weight")
        ds = world["tab"].get(bfl)
        parts = [want.get("transformer." + d) for d in ds] if ds and k.endswith(".weight") else None
        if parts and any(p is not None for p in parts):
            full = torch.cat(
                [
                    p if p is not None else torch.zeros(world["shapes"][d], dtype=torch.float64)
                    for p, d in zip(parts, ds)
                ]
            )
            full = swap(full) if bfl == SWAPPED else full
            assert _rel(got[k].double() - v.double(), full) <= 1e-5, k
            changed += 1
        else:
            assert torch.equal(got[k], v), k
    assert changed == len(world["tab"])
    clip_out = out.with_name("merged.clip_l.safetensors")
    t5_out = out.with_name("merged.t5xxl.safetensors")
    assert clip_out.exists() and t5_out.exists()
    t5, base5 = load_file(str(t5_out)), world["rf"].t5.state_dict()
    for n in [n for n in want if n.startswith("text_encoder_2.")]:
        key = n.removeprefix("text_encoder_2.") + ".weight"
        assert _rel(t5[key].double() - base5[key].double(), want[n]) <= 1e-6, n


def test_what_a_flux_merge_cannot_do_is_refused(world, tmp_path, capsys):
    """IterIS/RegMean without the text encoders they sample with, and a format Flux has no writer for."""
    from weightsmith.core.cli import main

    a, b = world["loras"]
    out = tmp_path / "m.safetensors"
    for method in ("iteris", "regmean"):
        rc = main(["merge", "--model", str(world["path"]), "--lora", str(a), "--lora", str(b), "--method", method,
                   "--out", str(out)])  # fmt: skip
        err = capsys.readouterr().err
        assert rc == 2 and "--text-encoder" in err and "T5-XXL" in err and "Traceback" not in err
    rc = main(["merge", "--model", str(world["path"]), "--lora", str(a), "--method", "linear", "--format", "diff",
               "--out", str(out)])  # fmt: skip
    assert rc == 2 and "--format lora" in capsys.readouterr().err
    assert not out.exists()


def test_a_lora_for_another_flux_width_is_refused(world, tmp_path):
    from weightsmith.core.lora_read import load_lora

    n = "context_embedder"
    rows, cols = world["shapes"][n]
    bad = tmp_path / "wide.safetensors"
    save_file(
        {
            f"transformer.{n}.lora_A.weight": torch.ones(1, cols + 8),
            f"transformer.{n}.lora_B.weight": torch.ones(rows, 1),
        },
        str(bad),
    )
    with pytest.raises(WeightsmithError, match="does not fit this Flux model"):
        load_lora(bad, world["model"])
    fused = tmp_path / "deep.safetensors"
    save_file(
        {
            "lora_unet_double_blocks_5_img_attn_qkv.lora_up.weight": torch.ones(3 * rows, 1),
            "lora_unet_double_blocks_5_img_attn_qkv.lora_down.weight": torch.ones(1, rows),
        },
        str(fused),
    )
    with pytest.raises(WeightsmithError, match="does not have"):
        load_lora(fused, world["model"])


def test_report_names_the_flux_inputs(world, tmp_path):
    from weightsmith.core.cli import main

    out, rep = tmp_path / "m.safetensors", tmp_path / "r.json"
    a, b = world["loras"]
    te = [x for t in world["tes"] for x in ("--text-encoder", str(t))]
    rc = main(["merge", "--model", str(world["path"]), *te, "--lora", str(a), "--lora", str(b), "--method", "svd",
               "--out", str(out), "--report", str(rep), "--no-progress"])  # fmt: skip
    assert rc == 0
    r = json.loads(rep.read_text())
    assert r["family"] == "flux" and r["method"] == "svd" and [d["name"] for d in r["loras"]] == [a.stem, b.stem]
    assert Path(r["output"]["t5_file"]).exists()


@pytest.mark.parametrize("layout", ["bfl", "diffusers"])
def test_every_linear_module_reads_as_diffusers_holds_it(world, tmp_path, layout):
    """``FluxModel.weight`` / ``weight_shape`` of every transformer linear module (rows of a fused BFL
    tensor, ``norm_out`` in diffusers' order) = the diffusers module's own weight."""
    from weightsmith.core.flux_io import load_flux
    from weightsmith.core.lab.random_models import write_random_flux

    rf = world["rf"]
    m = world["model"] if layout == "bfl" else load_flux(write_random_flux(rf, tmp_path, layout)[0])
    for n, mod in rf.transformer.named_modules():
        if isinstance(mod, torch.nn.Linear):
            assert m.weight_shape("transformer." + n) == tuple(mod.weight.shape), n
            assert torch.equal(m.weight("transformer." + n), mod.weight.detach().float()), n
    assert m.weight_shape("transformer.transformer_blocks.7.attn.to_q") is None


def lbw_flux_block(host_key: str) -> str:
    """LoRA Block Weight's ``get_flux_blocks`` (scripts/lora_block_weight.py), on a host's patch key with
    "." replaced by "_", as LBW calls it."""
    key = host_key.replace(".", "_")
    if "t5xxl" in key:
        return "T5"
    if "clip_" in key:
        return "CLIP"
    m = re.search(r"\_(\d+)\_", key)
    if "double_blocks" in key:
        return f"D{m.group(1).zfill(2)}"
    if "single_blocks" in key:
        return f"S{m.group(1).zfill(2)}"
    if "_in" in key:
        return "IN"
    if "final_layer" in key:
        return "OUT"
    return "Not Merge"


def test_block_weights_follow_lora_block_weight_on_flux(world, tmp_path):
    """A 61-value vector on a Flux merge: each module's ΔW scaled by the value of the block LBW's own rule
    gives its host key (ComfyUI/Forge ``diffusion_model.<BFL>``, ``clip_l.…``, ``t5xxl.…``)."""
    from weightsmith.core import blockweights as bwm
    from weightsmith.core.lora_read import load_lora
    from weightsmith.core.merge import merge

    host = {}
    for bfl, ds in world["tab"].items():
        for d in ds:
            host["transformer." + d] = f"diffusion_model.{bfl}.weight"
    for n in world["truth"][0]:
        if n.startswith("text_encoder."):
            host[n] = "clip_l.transformer." + n.removeprefix("text_encoder.") + ".weight"
        elif n.startswith("text_encoder_2."):
            host[n] = "t5xxl.transformer." + n.removeprefix("text_encoder_2.") + ".weight"
    values = [round(0.1 * (i % 7) + 0.05, 2) for i in range(61)]
    value = dict(zip(bwm.BLOCKIDFLUX, values))
    spec = ",".join(str(v) for v in values)
    a, b = (load_lora(p, world["model"]) for p in world["loras"])
    edit = merge(world["model"], [a, b], "linear", weights=list(W), blocks=[spec, None])
    ta, tb = world["truth"]
    for n, d in edit.deltas.items():
        blk = lbw_flux_block(host[n])
        assert blk in value, (n, host[n], blk)
        want = value[blk] * W[0] * ta.get(n, 0) + W[1] * tb.get(n, 0)
        assert _rel(d, want) <= 1e-6, (n, blk)
    assert {lbw_flux_block(host[n]) for n in ta} >= {"CLIP", "T5", "IN", "D00", "S00", "OUT"}
    rows = edit.report["loras"][0]["blocks"]["blocks"]
    assert {r["block"] for r in rows} >= {"CLIP", "T5", "IN", "D00", "S00", "OUT"}


def test_a_gpu_machine_and_missing_text_encoders(world, tmp_path, capsys, monkeypatch):
    """On a machine whose default device is a GPU the data-free Flux merge never moves the model (it has no
    UNet to move back); a LoRA that changes T5 without the T5 file loaded stops before the merge, naming
    --text-encoder; a transformer-only LoRA needs no text encoder."""
    import weightsmith.core.merge.cli as mcli
    from weightsmith.core.cli import main

    monkeypatch.setattr(mcli, "_device", lambda d: "cuda")
    a, b = world["loras"]
    out = tmp_path / "m.safetensors"
    rc = main(["merge", "--model", str(world["path"]), "--lora", str(a), "--lora", str(b), "--method", "concat",
               "--out", str(out), "--no-progress"])  # fmt: skip
    err = capsys.readouterr().err
    assert rc == 2 and "a_kohya changes the T5-XXL text encoder" in err and "--text-encoder" in err
    assert not out.exists()
    rc = main(["merge", "--model", str(world["path"]), "--lora", str(b), "--lora", f"{b}:0.5", "--method", "concat",
               "--out", str(out), "--no-progress"])  # fmt: skip
    assert rc == 0, capsys.readouterr().err
    back = load_lora(out, world["model"])
    _, tb = world["truth"]
    assert max(_rel(back.modules[n].delta(torch.float64), 1.5 * tb[n]) for n in tb) <= 1e-5


@pytest.mark.slow  # writes a 1.1 GB full-width transformer and runs two child processes: about 20 s
def test_flux_merge_bench_runs_and_resumes(tmp_path, capsys):
    """``bench merge --family flux`` at one double + one single block: the floor and ``concat`` rows come
    from the user's command in child processes (rank Σr = 32 for two rank-16 LoRAs), and a second run
    resumes from results.json without running them again."""
    from weightsmith.core.cli import main

    argv = ["bench", "merge", "--family", "flux", "--depth", "1,1", "--methods", "concat", "--workdir",
            str(tmp_path), "--json"]  # fmt: skip
    assert main(argv) == 0
    first = json.loads(capsys.readouterr().out)
    rows = first["rows"]
    assert set(rows) == {"floor", "concat"} and all(r["rc"] == 0 for r in rows.values())
    assert rows["concat"]["rank"] == 32 and rows["concat"]["out_mb"] > 0 and rows["concat"]["peak_rss_gib"] > 0
    log = (tmp_path / "bench.log").read_text()
    assert main(argv) == 0
    assert json.loads(capsys.readouterr().out)["rows"] == rows and (tmp_path / "bench.log").read_text() == log
