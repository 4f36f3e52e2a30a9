"""Erasure on Flux.1 (docs/flux.md, "Erasure on Flux") on a tiny random Flux: ``uce`` against an
independent float64 re-implementation of the public ``uce_flux_edit.py`` closed form, ErasePro's T5
stages lowering the held-out residual at ``txt_in``'s output, the stage declarations, the checkpoint in
every layout = base + ΔW, and the command line."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch

from weightsmith.core.erase.flux import script_index, t5_pairs
from weightsmith.core.erase.options import EraseOptions
from weightsmith.core.erase.pipeline import erase
from weightsmith.core.errors import WeightsmithError
from weightsmith.core.families.flux import CONDITIONING_STAGES, ERASE, T5_STAGE, stage_linears
from weightsmith.core.flux_io import load_flux, save_flux_edit
from weightsmith.core.lab.random_models import build_random_flux, write_random_flux
from weightsmith.core.lab.reference import reference_uce_flux
from weightsmith.core.tokenizer import load_t5_tokenizer

CTX, VEC = "transformer.context_embedder", "transformer.time_text_embed.text_embedder.linear_1"


@pytest.fixture(scope="module")
def rf():
    return build_random_flux(0)


@pytest.fixture(scope="module")
def files(rf, tmp_path_factory):
    root = tmp_path_factory.mktemp("fluxe")
    return {layout: write_random_flux(rf, root / layout, layout) for layout in ("bfl", "comfy", "diffusers")}


@pytest.fixture(scope="module")
def model(files):
    return load_flux(*files["bfl"])


def test_stage_declarations():
    """T5 blocks (q/k/v share an input, then o, then wi_0/wi_1, then wo), then txt_in and vector_in."""
    assert [cs.label for cs in CONDITIONING_STAGES] == ["txt_in", "vector_in"]
    assert [cs.linears(None) for cs in CONDITIONING_STAGES] == [[CTX], [VEC]]
    assert [cs.reads for cs in CONDITIONING_STAGES] == ["context", "pooled"]
    got = stage_linears(T5_STAGE, 3, ("k_proj", "v_proj", "fc1"))
    assert got == [
        (
            ("text_encoder_2.encoder.block.3.layer.0.SelfAttention.k", "layer.0.SelfAttention.k"),
            ("text_encoder_2.encoder.block.3.layer.0.SelfAttention.v", "layer.0.SelfAttention.v"),
        ),
        (
            ("text_encoder_2.encoder.block.3.layer.1.DenseReluDense.wi_0", "layer.1.DenseReluDense.wi_0"),
            ("text_encoder_2.encoder.block.3.layer.1.DenseReluDense.wi_1", "layer.1.DenseReluDense.wi_1"),
        ),
    ]
    assert ERASE.encoder_stages(type("M", (), {"text_encoders": {"text_encoder": 0}})()) == ()


def test_script_index_is_the_scripts_rule():
    """``attention_mask.sum() − 2`` of the padded encoding (negative wraps, as Python indexing does)."""
    tok = load_t5_tokenizer()
    for p in ["van gogh", "", "a photo of a cat"]:
        enc = tok([p], padding="max_length", max_length=256, truncation=True, return_tensors="pt")
        want = int(enc["attention_mask"].sum()) - 2
        assert script_index(enc.input_ids[0]) == want % 256


@pytest.mark.parametrize(
    "targets,anchors,preserve",
    [
        (["van gogh"], ["art"], ["monet"]),
        (["van gogh", "a red car"], [""], []),
        (["picasso"], ["a dog"], ["cat", "tree"]),
    ],
)
def test_uce_equals_the_public_script_closed_form(rf, model, targets, anchors, preserve):
    """Our ``uce`` = the script's closed form (float64, features from transformers' own T5EncoderModel and
    CLIPTextModel) with the targets ``W c*``; the script's ``module(c*)`` adds the bias once more, and the
    whole difference is exactly that term: ``b (Σ cᵀ + Σ pᵀ)(λI + Σ c cᵀ + Σ p pᵀ)⁻¹``."""
    opts = EraseOptions(preserve_captions=False)
    edit = erase(model, targets, anchors, preserve, "uce", opts)
    tok = load_t5_tokenizer()
    guides = anchors * len(targets) if len(anchors) == 1 else anchors

    def t5_encode(texts):
        ids = tok(texts, padding="max_length", max_length=256, truncation=True, return_tensors="pt").input_ids
        return rf.t5(ids).last_hidden_state

    def clip_pooled(texts):
        ids = model.tokenizers["text_encoder"](
            texts, padding="max_length", max_length=77, truncation=True, return_tensors="pt"
        ).input_ids
        return rf.clip(ids).pooler_output

    mods = {
        CTX: (rf.transformer.context_embedder.weight, rf.transformer.context_embedder.bias),
        VEC: (
            rf.transformer.time_text_embed.text_embedder.linear_1.weight,
            rf.transformer.time_text_embed.text_embedder.linear_1.bias,
        ),
    }
    with torch.no_grad():
        args = (t5_encode, clip_pooled, tok, mods, targets, guides, preserve)
        script = reference_uce_flux(*args)
        nobias = reference_uce_flux(*args, bias_in_targets=False)
    for name, (W, b) in mods.items():
        W64 = W.double()
        ours = edit.deltas[name].double()
        want = nobias[name] - W64
        assert (ours - want).norm() / want.norm() < 1e-5, name
        # the script's extra term, from its own matrices
        feats = []
        for t in list(targets) + list(preserve):
            with torch.no_grad():
                if name == CTX:
                    h = t5_encode([t])[0]
                    idx = (
                        int(tok([t], padding="max_length", max_length=256, return_tensors="pt")["attention_mask"].sum())
                        - 2
                    )
                    feats.append(h[idx].double())
                else:
                    feats.append(clip_pooled([t])[0].double())
        C = torch.stack(feats, 1)
        M = 0.5 * torch.eye(W.shape[1], dtype=torch.float64) + C @ C.T
        extra = b.double()[:, None] @ C.sum(1)[None, :] @ torch.linalg.inv(M)
        assert ((script[name] - W64) - (want + extra)).norm() / want.norm() < 1e-5


def _held_out_residual(model, edit, held_t, held_a) -> float:
    """‖txt_in′(T5′(target)) − txt_in(T5(anchor))‖ / ‖txt_in(T5(target)) − txt_in(T5(anchor))‖ over the
    paired positions of held-out prompts (the bias cancels), with T5′ the T5 the edit changed."""
    blocks = {}
    for n, d in edit.deltas.items():
        if n.startswith("text_encoder_2."):
            i, path = int(n.split(".")[3]), ".".join(n.split(".")[4:])
            blocks.setdefault(i, copy.deepcopy(model.t5.block(i)))
            blocks[i].get_submodule(path).weight.data += d
    ids_t, ids_a = model.tokenize(held_t, "text_encoder_2"), model.tokenize(held_a, "text_encoder_2")
    Xt, Xt0, Xa = model.t5.encode(ids_t, blocks), model.t5.encode(ids_t), model.t5.encode(ids_a)
    W = model.weight(CTX).double()
    Wn = W + edit.deltas[CTX].double()
    num = den = 0.0
    for b in range(len(held_t)):
        tp, ap = t5_pairs(ids_t[b], ids_a[b], "suffix", None)
        ya = Xa[b, list(ap)].double() @ W.T
        num += float(((Xt[b, list(tp)].double() @ Wn.T - ya) ** 2).sum())
        den += float(((Xt0[b, list(tp)].double() @ W.T - ya) ** 2).sum())
    return (num / den) ** 0.5


@pytest.mark.slow
def test_erasepro_lowers_the_held_out_residual_at_txt_in(model):
    """Complex held-out prompts (not among the training templates): after ErasePro the target's tokens
    at txt_in's output are closer to the anchor's than before (1.0 = unedited); each T5 stage is reported.
    With preservation the tiny T5 (32 wide, 2304 features) needs the ridge: the automatic choice solves
    it exactly (κ just above cond_limit) and over-fits (held-out residual 9.1; docs/flux.md)."""
    held_t = ["a painting of a village by van gogh at night", "van gogh style portrait of a man with a hat"]
    held_a = [p.replace("van gogh", "art") for p in held_t]
    edit = erase(model, ["van gogh"], ["art"], [], "erasepro")
    stages = [s["stage"] for s in edit.report["summary"]]
    assert stages == [f"text_encoder_2.layer{i}" for i in range(model.t5.n_layers)] + ["txt_in", "vector_in"]
    assert all(n.startswith(("text_encoder_2.encoder.block.", "transformer.")) for n in edit.deltas)
    assert _held_out_residual(model, edit, held_t, held_a) < 0.85
    ridge = EraseOptions(ridge=1e-2)
    kept = erase(model, ["van gogh"], ["art"], ["monet"], "erasepro", ridge)
    assert _held_out_residual(model, kept, held_t, held_a) < 0.6
    zr = erase(model, ["van gogh"], ["art"], ["monet"], "zero-residual", ridge)
    assert set(zr.deltas) == {CTX, VEC}  # the final stage only
    assert _held_out_residual(model, zr, held_t, held_a) < 0.6


def test_erasepro_edits_only_the_selected_t5_layers_and_sublayers(model):
    opts = EraseOptions(te_layers=(1, 1), te_sublayers=("q_proj", "fc2"))
    edit = erase(model, ["van gogh"], ["art"], [], "erasepro", opts)
    t5 = sorted(n for n in edit.deltas if n.startswith("text_encoder_2"))
    assert t5 == [
        "text_encoder_2.encoder.block.1.layer.0.SelfAttention.q",
        "text_encoder_2.encoder.block.1.layer.1.DenseReluDense.wo",
    ]


def test_erasure_reads_only_the_text_inputs_of_the_transformer(files):
    """The transformer stays in its file: erasure reads txt_in and vector_in.in_layer, nothing else."""
    m = load_flux(*files["bfl"])
    st = m.parts["transformer"].state
    seen = []
    orig = st.get
    st.get = lambda k: (seen.append(k), orig(k))[1]
    erase(m, ["van gogh"], ["art"], [], "uce")
    assert set(seen) <= {"txt_in.weight", "vector_in.in_layer.weight"} and seen


@pytest.mark.parametrize("layout", ["bfl", "comfy", "diffusers"])
def test_saved_checkpoint_is_base_plus_delta_in_each_layout(files, tmp_path, layout):
    m = load_flux(*files[layout])
    edit = erase(m, ["van gogh"], ["art"], [], "erasepro", EraseOptions(te_layers=(0, 1)))
    out = tmp_path / ("o" if layout == "diffusers" else "o.safetensors")
    info = save_flux_edit(m, edit.deltas, out)
    tes = files[layout][1]
    e = load_flux(out, [tes[0], info["files"][1]] if layout == "bfl" else tes)
    for n, d in edit.deltas.items():
        assert torch.allclose(e.weight(n), m.weight(n) + d, atol=1e-6), n
    assert len(info["stored"]) == len(edit.deltas)


def test_missing_text_encoders_and_lora_output_are_refused(files, tmp_path, capsys):
    path, tes = files["bfl"]
    with pytest.raises(WeightsmithError, match="--text-encoder"):
        erase(load_flux(path), ["van gogh"], ["art"], [], "uce")
    from weightsmith.core.cli import main

    rc = main(
        ["erase", "--model", str(path), "--text-encoder", str(tes[0]), "--text-encoder", str(tes[1]),
         "--target", "van gogh", "--format", "diff", "--out", str(tmp_path / "l.safetensors"), "--quiet"]
    )  # fmt: skip
    assert rc == 2 and "--format checkpoint" in capsys.readouterr().err
    assert not (tmp_path / "l.safetensors").exists()


def test_cli_erases_flux_from_separate_files(files, tmp_path, capsys):
    """``weightsmith erase --model flux1-dev.safetensors --text-encoder clip_l --text-encoder t5xxl``."""
    from weightsmith.core.cli import main

    path, tes = files["bfl"]
    out, rep = tmp_path / "no_vg.safetensors", tmp_path / "r.json"
    rc = main(
        ["erase", "--model", str(path), "--text-encoder", str(tes[1]), "--text-encoder", str(tes[0]),
         "--target", "van gogh", "--anchor", "art", "--method", "erasepro", "--te-layers", "0-0",
         "--out", str(out), "--report", str(rep), "--quiet"]
    )  # fmt: skip
    assert rc == 0
    report = json.loads(rep.read_text())
    assert report["family"] == "flux" and report["variant"] == "dev"
    files_out = [Path(f).name for f in report["export"]["files"]]
    assert files_out == ["no_vg.safetensors", "no_vg.t5xxl.safetensors"]
    assert "txt_in.weight" in report["export"]["stored"]
    printed = capsys.readouterr().out
    assert "txt_in" in printed and "no_vg.t5xxl.safetensors" in printed


@pytest.mark.slow
def test_bench_full_size_files_have_the_real_parameter_counts(tmp_path, monkeypatch):
    """``bench erase --family flux --size full`` writes T5-XXL (4,762,310,656 parameters), CLIP-L
    (123,060,480) and a full-width 1 + 1 block transformer (545,548,096; docs/flux.md): counted here
    without writing them (each file's tensors are listed, three drawn)."""
    import weightsmith.core.safe_io as sio
    from weightsmith.core.lab import flux_bench

    seen = {}

    def listed(meta, get, path, metadata=None):
        ks = sorted(meta)
        seen[Path(path).name] = sum(torch.Size(s).numel() for _, s in meta.values())
        for k in (ks[0], ks[len(ks) // 2], ks[-1]):
            t = get(k)
            assert t.dtype == torch.bfloat16 and tuple(t.shape) == tuple(meta[k][1]) and torch.isfinite(t.float()).all()

    monkeypatch.setattr(sio, "atomic_save_streamed", listed)
    flux_bench.write_full_random_flux(tmp_path, 0)
    assert seen == {
        "t5xxl_bf16.safetensors": 4_762_310_656,
        "clip_l.safetensors": 123_060_480,
        "flux1-dev.safetensors": 545_548_096,
    }


@pytest.mark.slow
def test_bench_erase_flux_tiny_runs(capsys):
    from weightsmith.core.cli import main

    assert main(["bench", "erase", "--family", "flux", "--size", "tiny", "--json"]) == 0
    out = capsys.readouterr().out
    rows = json.loads(out[out.index("{") :])["rows"]
    assert len(rows) == 5 and all(r["held_out_residual"] >= 0 and r["peak_rss_gib"] > 0 for r in rows.values())


def test_t5_runs_one_block_at_a_time(files):
    """With T5-XXL's setting (blocks not kept), ErasePro never holds more than one T5 block built from
    the file plus its edited copy (docs/flux.md, "How Weightsmith holds a Flux model")."""
    import gc
    import weakref

    from transformers.models.t5.modeling_t5 import T5Block

    m = load_flux(*files["bfl"])
    m.t5.keep_blocks = False
    alive, peak = [], [0]
    build = m.t5.block

    def counted(i):
        blk = build(i)
        gc.collect()
        alive[:] = [r for r in alive if r() is not None]
        alive.append(weakref.ref(blk))
        peak[0] = max(peak[0], len(alive))
        return blk

    m.t5.block = counted
    orig_deepcopy = copy.deepcopy

    def deep(x, *a):
        out = orig_deepcopy(x, *a)
        if isinstance(out, T5Block):
            alive.append(weakref.ref(out))
            peak[0] = max(peak[0], len([r for r in alive if r() is not None]))
        return out

    import weightsmith.core.erase.flux as ef

    ef.copy.deepcopy, saved = deep, ef.copy.deepcopy
    try:
        erase(m, ["van gogh"], ["art"], [], "erasepro")
    finally:
        ef.copy.deepcopy = saved
    assert 1 <= peak[0] <= 2, peak[0]
