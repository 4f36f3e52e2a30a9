"""Flux.1 in the hosts (docs/flux.md, "Flux in ComfyUI and Forge"): core's host glue
(:mod:`weightsmith.core.flux_host`) on a tiny random Flux, and the ComfyUI Erase / Save nodes on
ComfyUI 0.3.75's own Flux model in its venv (tests/comfy/inproc_flux_host.py). Everything is checked
against an independent computation: the erasure computed from the files (:func:`load_flux`), the host
keys and fused row ranges written out by hand here."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from weightsmith.core.edit import Edit
from weightsmith.core.erase.options import EraseOptions
from weightsmith.core.erase.pipeline import erase
from weightsmith.core.errors import WeightsmithError
from weightsmith.core.flux_host import host_patches, model_from_host_state, t5_base
from weightsmith.core.flux_io import load_flux
from weightsmith.core.lab.random_models import build_random_flux, write_random_flux
from weightsmith.core.state_files import DictState

H = 32  # the tiny transformer's width (TINY_FLUX: 2 heads of 16)
CTX, VEC = "transformer.context_embedder", "transformer.time_text_embed.text_embedder.linear_1"


def host_key(name: str) -> str:
    """The host key of an erased module, written out independently of core/flux_host.py."""
    if name == CTX:
        return "diffusion_model.txt_in.weight"
    if name == VEC:
        return "diffusion_model.vector_in.in_layer.weight"
    assert name.startswith("text_encoder_2.encoder.block.")
    return "t5xxl.transformer." + name.removeprefix("text_encoder_2.") + ".weight"


#: synthetic edit on fused tensors: canonical name -> (host key, rows, swapped halves)
FUSED = {
    "transformer.transformer_blocks.0.attn.to_k": ("diffusion_model.double_blocks.0.img_attn.qkv.weight", (H, 2 * H)),
    "transformer.transformer_blocks.0.attn.add_v_proj": (
        "diffusion_model.double_blocks.0.txt_attn.qkv.weight",
        (2 * H, 3 * H),
    ),
    "transformer.single_transformer_blocks.0.proj_mlp": (
        "diffusion_model.single_blocks.0.linear1.weight",
        (3 * H, 7 * H),
    ),
    "transformer.single_transformer_blocks.0.attn.to_q": ("diffusion_model.single_blocks.0.linear1.weight", (0, H)),
    "transformer.norm_out.linear": ("diffusion_model.final_layer.adaLN_modulation.1.weight", "swap"),
    "text_encoder.text_model.encoder.layers.0.self_attn.q_proj": (
        "clip_l.transformer.text_model.encoder.layers.0.self_attn.q_proj.weight",
        None,
    ),
}


def expected_fused(deltas: dict, base: dict) -> dict:
    """host key -> full ΔW, from FUSED (zero outside the module's rows)."""
    out = {}
    for name, (key, rows) in FUSED.items():
        acc = out.setdefault(key, torch.zeros_like(base[key]))
        d = deltas[name]
        if rows == "swap":
            acc += torch.cat([d[d.shape[0] // 2 :], d[: d.shape[0] // 2]])
        elif rows is None:
            acc += d
        else:
            acc[rows[0] : rows[1]] += d
    return out


def _rel(a, b) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("fluxhost")
    rf = build_random_flux(0)
    model_path, tes = write_random_flux(rf, root / "bfl", "bfl")
    return {"root": root, "model": model_path, "te": tes}


def host_state(files) -> dict:
    """The tiny Flux under ComfyUI's / Forge's keys, as their patchers hold it."""
    st = {"diffusion_model." + k: v for k, v in load_file(str(files["model"])).items()}
    for f, pre in zip(files["te"], ("clip_l.transformer.", "t5xxl.transformer.")):
        st.update({pre + k: v for k, v in load_file(str(f)).items()})
    return st


@pytest.fixture(scope="module")
def reference(files):
    """The erasure computed from the files (the CLI's path)."""
    m = load_flux(files["model"], files["te"])
    return erase(m, ["cat"], ["dog"], method="erasepro", options=EraseOptions(expand_prompts=False))


def fused_edit(seed=3) -> Edit:
    g = torch.Generator().manual_seed(seed)
    shapes = {
        "transformer.transformer_blocks.0.attn.to_k": (H, H),
        "transformer.transformer_blocks.0.attn.add_v_proj": (H, H),
        "transformer.single_transformer_blocks.0.proj_mlp": (4 * H, H),
        "transformer.single_transformer_blocks.0.attn.to_q": (H, H),
        "transformer.norm_out.linear": (2 * H, H),
        "text_encoder.text_model.encoder.layers.0.self_attn.q_proj": (64, 64),
    }
    deltas, factors = {}, {}
    for n, (o, i) in shapes.items():
        up, down = torch.randn(o, 2, generator=g) * 0.05, torch.randn(2, i, generator=g) * 0.05
        deltas[n], factors[n] = up @ down, (up, down)
    return Edit("flux", {}, deltas, factors, {"method": "test"})


# ----------------------------------------------------------------------------------------------
# core's host glue
def test_host_model_gives_the_files_erasure(files, reference):
    """A FluxModel over host-keyed weights (nothing copied) erases exactly as the model read from the files."""
    st = host_state(files)
    m = model_from_host_state(DictState(st), where="test")
    assert m.variant == "dev" and set(m.text_encoders) == {"text_encoder", "text_encoder_2"}
    edit = erase(m, ["cat"], ["dog"], method="erasepro", options=EraseOptions(expand_prompts=False))
    assert sorted(edit.deltas) == sorted(reference.deltas)
    assert any(n.startswith("text_encoder_2.") for n in edit.deltas) and CTX in edit.deltas and VEC in edit.deltas
    for n, d in reference.deltas.items():
        assert _rel(edit.deltas[n], d) <= 1e-5, n


def test_host_patches_put_each_module_on_its_key_and_rows(files, reference):
    st = host_state(files)
    shapes = {k: tuple(v.shape) for k, v in st.items()}
    den, te = host_patches(reference, shapes)
    assert set(den) | set(te) == {host_key(n) for n in reference.deltas}
    assert all(k.startswith("diffusion_model.") for k in den) and not any(k.startswith("diffusion_model.") for k in te)
    for n, d in reference.deltas.items():
        kind, (got,) = {**den, **te}[host_key(n)]
        assert kind == "diff" and torch.equal(got, d.reshape(got.shape))
    edit = fused_edit()
    den, te = host_patches(edit, shapes)
    want = expected_fused(edit.deltas, st)
    assert set(den) | set(te) == set(want)
    for k, w in want.items():
        assert torch.allclose({**den, **te}[k][1][0], w, rtol=0, atol=1e-7), k


def test_host_patches_refuse_another_model(files, reference):
    st = host_state(files)
    shapes = {k: tuple(v.shape) for k, v in st.items()}
    bad = Edit("flux", {}, {CTX: torch.zeros(3, 3)}, {}, {})
    with pytest.raises(WeightsmithError, match="computed for another model"):
        host_patches(bad, shapes)
    gone = {k: v for k, v in shapes.items() if not k.startswith("t5xxl.")}
    with pytest.raises(WeightsmithError, match="does not have"):
        host_patches(reference, gone)
    with pytest.raises(WeightsmithError, match="no linear layer of the Flux transformer"):
        host_patches(Edit("flux", {}, {"transformer.nope": torch.zeros(1, 1)}, {}, {}), shapes)


def test_t5_base_of_a_host_model_is_the_bare_t5_file(files, reference, tmp_path):
    """The T5 file written beside a host edit's LoRA has the T5 file's own keys, base + ΔW."""
    from weightsmith.core.lora_write import save_lora

    st = host_state(files)
    m = model_from_host_state(DictState(st), where="test")
    base, prefix = t5_base(m)
    t5_file = load_file(str(files["te"][1]))
    assert sorted(base.keys()) == sorted(t5_file) and prefix == ""
    info = save_lora(reference, tmp_path / "e.safetensors", t5_base=base, t5_prefix=prefix)
    written = load_file(info["t5_file"])
    assert sorted(written) == sorted(t5_file)
    for k, v in t5_file.items():
        name = "text_encoder_2." + k.removesuffix(".weight")
        if name in reference.deltas:
            assert _rel(written[k] - v, reference.deltas[name]) <= 1e-5, k
        else:
            assert torch.equal(written[k], v), k


# ----------------------------------------------------------------------------------------------
# ComfyUI 0.3.75, in its venv
@pytest.mark.host
@pytest.mark.slow  # ComfyUI's import and the nodes in its venv: about 30 s on 2 cores
def test_comfyui_erase_and_save_nodes_on_flux(files, reference, tmp_path):
    """Erase Concepts on a Flux MODEL (ComfyUI's own Flux class, tiny width) + CLIP-L/T5 CLIP: the patched
    clones = base + ΔW of the erasure computed from the files (rel. ≤ 1e-5), every other weight and the
    inputs bit-identical; Save Edit as LoRA's file through ComfyUI's LoraLoader = the in-graph patch with
    0 keys not loaded, and its T5 file = the in-graph T5; fused tensors' rows; merging refused."""
    sys.path.insert(0, str(Path(__file__).parent / "comfy"))
    import harness as Hn

    if Hn.skip_requested():
        pytest.skip("WEIGHTSMITH_SKIP_COMFY is set (developer escape hatch; CI runs these tests)")
    if not Hn.VENV_PY.exists():
        try:
            Hn.run_setup(checkpoint=False)
        except Hn.SetupError as e:
            pytest.fail(f"the ComfyUI test environment could not be set up: {e}")
    cfg = {
        "image_model": "flux",
        "in_channels": 1,
        "out_channels": 1,
        "patch_size": 2,
        "vec_in_dim": 64,
        "context_in_dim": 32,
        "hidden_size": H,
        "mlp_ratio": 4.0,
        "num_heads": 2,
        "depth": 1,
        "depth_single_blocks": 1,
        "axes_dim": [4, 4, 8],
        "theta": 10000,
        "qkv_bias": True,
        "guidance_embed": True,
    }
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    (tmp_path / "transformer.safetensors").write_bytes(files["model"].read_bytes())
    for f, name in zip(files["te"], ("clip_l", "t5xxl")):
        (tmp_path / f"{name}.safetensors").write_bytes(f.read_bytes())
    r = subprocess.run(
        [str(Hn.VENV_PY), str(Path(__file__).parent / "comfy" / "inproc_flux_host.py"), str(Hn.COMFY), str(tmp_path)],
        capture_output=True,
        text=True,
        env=Hn.venv_env(),
        timeout=900,
    )
    assert r.returncode == 0, r.stderr[-5000:]
    res = json.loads((tmp_path / "result.json").read_text())
    base = host_state(files)
    base = {k: v.float() for k, v in base.items()}

    # 1. in-graph erasure = base + the files' ΔW; nothing else changed; the inputs untouched
    assert res["clones"] and res["base_bit_identical"] and res["base_patches"] == 0
    assert res["erase_modules"] == sorted(reference.deltas)
    patched = load_file(str(tmp_path / "erase_patched.safetensors"))
    assert sorted(patched) == sorted(base)
    edited = {host_key(n): d for n, d in reference.deltas.items()}
    worst = 0.0
    for k, v in base.items():
        if k in edited:
            worst = max(worst, _rel(patched[k] - v, edited[k].reshape(v.shape)))
        else:
            assert torch.equal(patched[k], v), k
    assert worst <= 1e-5, worst
    # 2. the saved LoRA through ComfyUI's LoraLoader = the in-graph patch; its T5 file = the in-graph T5
    assert res["erase_not_loaded"] == [] and res["erase_lora_keys"] > 0
    assert len(res["t5_files"]) == 1 and "T5" in res["save_text"]
    loaded = load_file(str(tmp_path / "erase_loaded.safetensors"))
    t5 = load_file(res["t5_files"][0])
    for k, v in base.items():
        if k.startswith("t5xxl."):
            assert torch.equal(loaded[k], v), k  # the LoRA has no T5 part: it comes as a file
            got = t5[k.removeprefix("t5xxl.transformer.")]
            assert (_rel(got - v, edited[k].reshape(v.shape)) <= 1e-5) if k in edited else torch.equal(got, v), k
        elif k in edited:
            assert _rel(loaded[k] - v, patched[k] - v) <= 1e-5, k  # LoraLoader's ΔW = the in-graph ΔW
        else:
            assert torch.equal(loaded[k], v), k
    # 3. fused tensors: the module's rows only, in-graph and through LoraLoader alike
    truth = torch.load(str(tmp_path / "fused_truth.pt"))["deltas"]
    want = expected_fused(truth, base)
    fp, fl = (
        load_file(str(tmp_path / "fused_patched.safetensors")),
        load_file(str(tmp_path / "fused_loaded.safetensors")),
    )
    assert res["fused_not_loaded"] == [] and res["fused_lora_keys"] > 0
    for k, v in base.items():
        if k in want:
            assert _rel(fp[k] - v, want[k]) <= 1e-5, k
            assert _rel(fl[k] - v, want[k]) <= 1e-5, k
            assert torch.equal(fp[k][want[k] == 0], v[want[k] == 0]), k  # other rows untouched
        else:
            assert torch.equal(fp[k], v) and torch.equal(fl[k], v), k
    # 4. merging on Flux: concat = the fused LoRA + 0.5 × the erase LoRA, as ComfyUI's own LoraLoader loaded
    #    each (steps 2 and 3), in-graph and through LoraLoader; IterIS refused with the methods that work
    e_l = load_file(str(tmp_path / "erase_loaded.safetensors"))
    mp = load_file(str(tmp_path / "merge_patched.safetensors"))
    ml = load_file(str(tmp_path / "merge_loaded.safetensors"))
    assert res["merge_not_loaded"] == [] and res["merge_lora_keys"] > 0
    n_changed = 0
    for k, v in base.items():
        want = (fl[k] - v) + 0.5 * (e_l[k] - v)
        if want.abs().max() > 0:
            assert _rel(mp[k] - v, want) <= 1e-5 and _rel(ml[k] - v, want) <= 1e-5, k
            n_changed += 1
        else:
            assert torch.equal(mp[k], v) and torch.equal(ml[k], v), k
    assert n_changed >= 5
    # 5. IterIS in-graph = core's IterIS on the files (same options, prompts, weights); the saved LoRA through
    #    LoraLoader = the in-graph patch, 0 keys not loaded
    from weightsmith.core.flux_io import load_flux
    from weightsmith.core.merge import MergeOptions, merge

    ours = torch.load(str(tmp_path / "iteris_deltas.pt"))["deltas"]
    opts = MergeOptions(**res["iteris_options"])
    ref = merge(
        load_flux(files["model"], files["te"]),
        res["iteris_loras"],
        "iteris",
        weights=[1.0, 0.5],
        prompts=[["a red cat on a tree"], ["a dog at night"]],
        options=opts,
    )
    assert sorted(ours) == sorted(ref.deltas)
    for n in ref.deltas:
        assert _rel(ours[n], ref.deltas[n]) <= 1e-4, n
    ip, il = (
        load_file(str(tmp_path / "iteris_patched.safetensors")),
        load_file(str(tmp_path / "iteris_loaded.safetensors")),
    )
    assert res["iteris_not_loaded"] == [] and res["iteris_lora_keys"] > 0
    n_changed = 0
    for k, v in base.items():
        if not k.startswith("t5xxl.") and not torch.equal(ip[k], v):
            assert _rel(il[k] - v, ip[k] - v) <= 1e-5, k
            n_changed += 1
    assert n_changed >= 5 and "iteris" in res["iteris_report_head"]
    print(f"ComfyUI 0.3.75 Flux erase in-graph: worst rel. error {worst:.1e}")


class _Patcher:
    """What the adapter reads of a ComfyUI ModelPatcher: ``get_key_patches`` (current shape of entries)."""

    def __init__(self, sd):
        self.sd = sd

    def get_key_patches(self):
        return {k: [(v, None)] for k, v in self.sd.items()}


def test_comfy_adapter_refuses_a_clip_without_t5_and_clip_skip(files):
    """Connecting an SD CLIP (no t5xxl) or setting clip_skip on Flux: a message saying what to connect."""
    from types import SimpleNamespace

    from weightsmith.nodes import comfy_adapter as ca

    st = host_state(files)
    model = _Patcher({k: v for k, v in st.items() if k.startswith("diffusion_model.")})
    te = {k: v for k, v in st.items() if not k.startswith("diffusion_model.")}
    assert ca.is_flux(model) and not ca.is_flux(_Patcher(te))
    sd_clip = SimpleNamespace(cond_stage_model=SimpleNamespace(clip_l=1), patcher=_Patcher(te))
    with pytest.raises(WeightsmithError, match="DualCLIPLoader with type flux"):
        ca.sdmodel_from_comfy(model, sd_clip, flux_ok=True)
    clip = SimpleNamespace(cond_stage_model=SimpleNamespace(clip_l=1, t5xxl=1), patcher=_Patcher(te))
    with pytest.raises(WeightsmithError, match="clip_skip does not apply to Flux"):
        ca.sdmodel_from_comfy(model, clip, clip_skip=2, flux_ok=True)
    with pytest.raises(WeightsmithError, match="Block Weights does not work on Flux yet"):
        ca.sdmodel_from_comfy(model, clip, what="Block Weights")
    m = ca.sdmodel_from_comfy(model, clip, flux_ok=True)  # the effective weights, read lazily
    assert m.family == "flux" and torch.equal(m.weight(CTX), st["diffusion_model.txt_in.weight"].float())
