"""Flux.1 models as users have them (docs/flux.md): every layout read from its keys, the encoders
against transformers' own modules, the shipped T5 vocabulary, edits written back in the input's layout
with their survival in the stored dtype measured."""

from __future__ import annotations

import gzip
import hashlib
import os
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from weightsmith.core.errors import WeightsmithError
from weightsmith.core.flux_io import load_flux, save_flux_edit
from weightsmith.core.lab.random_models import build_random_flux, write_random_flux
from weightsmith.core.layouts.flux import scale_key
from weightsmith.core.tokenizer import T5_TOKENIZER, load_t5_tokenizer

COMFY_T5 = Path(
    os.path.expanduser("~/.cache/weightsmith-tests/comfyui/comfy/text_encoders/t5_tokenizer/tokenizer.json")
)
PROMPTS = ["a photo of van gogh", "", "a city street at night, high quality"]
CTX, VEC = "transformer.context_embedder", "transformer.time_text_embed.text_embedder.linear_1"


@pytest.fixture(scope="module")
def rf():
    return build_random_flux(0)


@pytest.fixture(scope="module")
def written(rf, tmp_path_factory):
    root = tmp_path_factory.mktemp("flux")
    return {layout: write_random_flux(rf, root / layout, layout) for layout in ("bfl", "comfy", "diffusers")}


def _read_all(path) -> dict:
    with safe_open(str(path), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


def test_shipped_t5_vocabulary_is_the_one_the_hosts_ship():
    """The asset is FLUX.1-schnell's / ComfyUI's tokenizer.json byte for byte (hash in its NOTICE.md)."""
    raw = gzip.open(T5_TOKENIZER, "rb").read()
    notice = (T5_TOKENIZER.parent / "NOTICE.md").read_text()
    assert hashlib.sha256(raw).hexdigest() in notice
    if COMFY_T5.is_file():
        assert raw == COMFY_T5.read_bytes()


def test_t5_encoding_as_the_hosts_do():
    """No BOS, the prompt's tokens, </s> (1), <pad> (0) up to 256 (or 512); the ids are the
    ``tokenizers`` library's own encoding of the vocabulary."""
    from tokenizers import Tokenizer

    tok = load_t5_tokenizer()
    ref = Tokenizer.from_str(gzip.open(T5_TOKENIZER, "rt", encoding="utf-8").read())
    ids = tok(PROMPTS, padding="max_length", max_length=tok.model_max_length, truncation=True).input_ids
    for p, row in zip(PROMPTS, ids):
        want = ref.encode(p).ids  # the post-processor appends </s>
        assert want[-1] == 1 and 1 not in want[:-1]
        assert len(row) == 256 and row[: len(want)] == want and set(row[len(want) :]) <= {0}
    assert load_t5_tokenizer(length=512).model_max_length == 512
    with pytest.raises(WeightsmithError, match="tokenizer.json"):
        load_t5_tokenizer(T5_TOKENIZER.parent.parent / "clip_bpe")


@pytest.mark.parametrize("layout", ["bfl", "comfy", "diffusers"])
def test_every_layout_reads_the_same_model(rf, written, layout):
    """T5 run layer by layer = transformers' T5EncoderModel; CLIP pooled = CLIPTextModel's pooler output;
    the two text-input weights as the transformer holds them (BFL ``txt_in``/``vector_in.in_layer``)."""
    path, tes = written[layout]
    m = load_flux(path, tes)
    assert m.variant == "dev" and m.source.format == layout
    ids = m.tokenize(PROMPTS, "text_encoder_2")
    assert torch.equal(m.t5_hidden(PROMPTS), rf.t5(ids).last_hidden_state)
    cids = m.tokenize(PROMPTS, "text_encoder")
    assert torch.equal(m.clip_pooled(PROMPTS), rf.clip(cids).pooler_output)
    assert torch.equal(m.weight(CTX), rf.transformer.context_embedder.weight)
    assert torch.equal(m.weight(VEC), rf.transformer.time_text_embed.text_embedder.linear_1.weight)
    assert torch.equal(m.bias(CTX), rf.transformer.context_embedder.bias)


def test_dev_or_schnell_from_keys_never_from_the_name(rf, tmp_path):
    schnell = build_random_flux(1, variant="schnell")
    p, tes = write_random_flux(schnell, tmp_path / "s", "bfl")
    misnamed = tmp_path / "flux1-dev.safetensors"
    os.replace(p, misnamed)
    assert load_flux(misnamed, tes).variant == "schnell"
    p, tes = write_random_flux(rf, tmp_path / "d", "bfl")
    os.replace(p, tmp_path / "flux1-schnell.safetensors")
    assert load_flux(tmp_path / "flux1-schnell.safetensors", tes).variant == "dev"


@pytest.mark.parametrize("t5_dtype", [torch.float16, torch.bfloat16, torch.float8_e4m3fn, "scaled_fp8"])
def test_t5_in_stored_precisions(rf, tmp_path, t5_dtype):
    """A T5 file in fp16/bf16/fp8 or ComfyUI's scaled fp8 (weight · scale_weight) runs exactly as
    T5EncoderModel holding the dequantised values."""
    path, tes = write_random_flux(rf, tmp_path, "bfl", t5_dtype=t5_dtype)
    m = load_flux(path, tes)
    sd = _read_all(tes[1])
    deq = {}
    for k, v in sd.items():
        if k.endswith(".scale_weight") or k == "scaled_fp8":
            continue
        s = sd.get(scale_key(k))
        deq[k] = v.float() * s.float() if s is not None else v.float()
    ref = type(rf.t5)(rf.t5.config).eval()
    ref.load_state_dict(deq, strict=False)
    ref.encoder.embed_tokens.weight = ref.shared.weight
    ids = m.tokenize(PROMPTS, "text_encoder_2")
    got, want = m.t5_hidden(PROMPTS), ref(ids).last_hidden_state
    assert torch.allclose(got, want, atol=1e-5, rtol=1e-5)
    if t5_dtype == "scaled_fp8":
        assert "scaled_fp8" in sd and any(k.endswith(".scale_weight") for k in sd)


def test_bad_inputs_say_what_to_do(written, tmp_path):
    path, tes = written["bfl"]
    with pytest.raises(WeightsmithError, match="not a Flux model"):
        load_flux(tes[1])
    with pytest.raises(WeightsmithError, match="Flux transformer, not a text encoder"):
        load_flux(path, [path])
    with pytest.raises(WeightsmithError, match="two T5"):
        load_flux(path, [tes[1], tes[1]])
    with pytest.raises(WeightsmithError, match="not found"):
        load_flux(path, [tmp_path / "missing.safetensors"])
    bare = load_flux(path)  # the transformer alone loads; erasure then names the missing files
    with pytest.raises(WeightsmithError, match="--text-encoder"):
        bare.require_text_encoders("erasure on Flux")
    other = build_random_flux(2, t5_layers=2)
    other.t5 = type(other.t5)(type(other.t5.config)(**{**other.t5.config.to_dict(), "d_model": 16, "d_kv": 4}))
    _, tes2 = write_random_flux(other, tmp_path / "o", "bfl")
    with pytest.raises(WeightsmithError, match="does not belong"):
        load_flux(path, [tes[0], tes2[1]])


def _deltas(m, seed=0):
    g = torch.Generator().manual_seed(seed)
    names = [CTX, VEC, m.t5_name(1, "k"), m.t5_name(0, "v")]
    return {n: 0.05 * torch.randn(m.weight(n).shape, generator=g) for n in names}


@pytest.mark.parametrize("layout", ["bfl", "comfy", "diffusers"])
def test_edit_written_in_the_input_layout(written, tmp_path, layout):
    """The written model = base + ΔW at the edited weights (read back through the loader), every other
    tensor byte-identical; a separate T5 file gives a separate T5 file; same edit, same bytes."""
    path, tes = written[layout]
    m = load_flux(path, tes)
    d = _deltas(m)
    out = tmp_path / ("edited" if layout == "diffusers" else "edited.safetensors")
    info = save_flux_edit(m, d, out, {"ws_method": "test"})
    if layout == "bfl":
        assert [Path(f).name for f in info["files"]] == ["edited.safetensors", "edited.t5xxl.safetensors"]
        e = load_flux(out, [tes[0], Path(info["files"][1])])
    else:
        assert len(info["files"]) == 1
        e = load_flux(out, tes)
    assert e.source.format == layout
    for n, delta in d.items():
        assert torch.allclose(e.weight(n), m.weight(n) + delta, atol=1e-6), n
    assert all(v["kept"] == pytest.approx(1.0, abs=1e-6) for v in info["stored"].values())
    # every other tensor untouched
    pairs = (
        [(path, out), (tes[1], Path(info["files"][1]))]
        if layout == "bfl"
        else [(path, out)]
        if layout == "comfy"
        else [
            (path / c / f, out / c / f)
            for c, f in (
                ("transformer", "diffusion_pytorch_model.safetensors"),
                ("text_encoder_2", "model.safetensors"),
                ("text_encoder", "model.safetensors"),
            )
        ]
    )
    edited_keys = {v["key"] for v in info["stored"].values()}
    for a, b in pairs:
        A, B = _read_all(a), _read_all(b)
        assert set(A) == set(B)
        same = [k for k in A if torch.equal(A[k], B[k])]
        assert set(A) - set(same) <= edited_keys
    if layout != "diffusers":
        again = tmp_path / "again.safetensors"
        save_flux_edit(m, d, again, {"ws_method": "test"})
        assert again.read_bytes() == out.read_bytes()


def test_fp8_output_reports_how_much_of_the_edit_survives(rf, tmp_path):
    """fp8 storage (plain and scaled): the written ΔW is what the stored values give back; ``kept`` and
    ``rel_error`` are that ΔW against the edit, computed here independently; nothing non-finite."""
    for dt in (torch.float8_e4m3fn, "scaled_fp8"):
        path, tes = write_random_flux(rf, tmp_path / str(dt), "bfl", dtype=dt, t5_dtype=dt)
        m = load_flux(path, tes)
        d = _deltas(m)
        d[CTX] = d[CTX] * 40  # strong enough to show through fp8's steps
        out = tmp_path / f"fp8-{dt}.safetensors"
        info = save_flux_edit(m, d, out)
        e = load_flux(out, [tes[0], Path(info["files"][1])])
        for n, delta in d.items():
            part, key = m.weight_key(n)
            st = info["stored"][key]
            assert st["dtype"] == "float8_e4m3fn" and st["scaled"] == (dt == "scaled_fp8")
            dw = (e.weight(n) - m.weight(n)).double()
            kept = float((dw * delta.double()).sum() / delta.double().norm() ** 2)
            assert st["kept"] == pytest.approx(kept, rel=1e-6, abs=1e-9)
            assert st["rel_error"] == pytest.approx(
                float((dw - delta.double()).norm() / delta.double().norm()), rel=1e-6
            )
            assert torch.isfinite(e.weight(n)).all()
        st = info["stored"]["txt_in.weight"]
        assert 0.95 < st["kept"] < 1.05 and st["saturated"] == 0
        # the strong edit needs a larger scale than the file's: it grows instead of saturating
        assert (st.get("scale_grew", 1.0) > 1.0) == (dt == "scaled_fp8")


def test_overflowing_half_precision_is_refused_and_nothing_written(rf, tmp_path):
    path, tes = write_random_flux(rf, tmp_path, "bfl", dtype=torch.float16)
    m = load_flux(path, tes)
    out = tmp_path / "x.safetensors"
    with pytest.raises(WeightsmithError, match="overflows float16"):
        save_flux_edit(m, {CTX: torch.full(m.weight(CTX).shape, 1e6)}, out)
    assert not out.exists() and not list(tmp_path.glob(".ws-*"))


def test_a_model_folders_own_t5_tokenizer_wins(written, tmp_path):
    """A diffusers folder's tokenizer_2/ is used instead of the shipped vocabulary (here one that
    lower-cases first, so "A CAT" encodes as "a cat" does)."""
    import json
    import shutil

    src, _ = written["diffusers"]
    folder = tmp_path / "own"
    shutil.copytree(src, folder)
    tj = json.loads((folder / "tokenizer_2" / "tokenizer.json").read_text())
    tj["normalizer"] = {"type": "Sequence", "normalizers": [{"type": "Lowercase"}, tj["normalizer"]]}
    (folder / "tokenizer_2" / "tokenizer.json").write_text(json.dumps(tj))
    own, shipped = load_flux(folder), load_flux(src)
    upper, lower = own.tokenize(["A CAT"], "text_encoder_2"), shipped.tokenize(["a cat"], "text_encoder_2")
    assert torch.equal(upper, lower)
    assert not torch.equal(shipped.tokenize(["A CAT"], "text_encoder_2"), lower)


def test_flux_files_are_read_without_staying_resident(rf, tmp_path):
    """Flux parts read each tensor with a positioned read (``StateFile(mapped=False)``): the same values
    as through the memory map, in every stored dtype, and the pages read do not stay resident."""
    from weightsmith.core.memory import rss
    from weightsmith.core.safe_io import atomic_save_streamed
    from weightsmith.core.state_files import StateFile

    path, tes = write_random_flux(rf, tmp_path / "f", "bfl", dtype="scaled_fp8", t5_dtype=torch.bfloat16)
    for f in (path, *tes):
        a, b = StateFile(f), StateFile(f, mapped=False)
        for k in a.keys():
            x, y = a.get(k), b.get(k)
            assert x.dtype == y.dtype and x.shape == y.shape
            assert torch.equal(
                x.view(torch.uint8) if x.element_size() == 1 else x, y.view(torch.uint8) if y.element_size() == 1 else y
            )
    big = tmp_path / "big.safetensors"
    shape = (2048, 32768)  # 128 MiB each, 512 MiB in all
    atomic_save_streamed(
        {f"t{i}": (torch.bfloat16, shape) for i in range(4)}, lambda k: torch.ones(shape, dtype=torch.bfloat16), big
    )
    sf = StateFile(big, mapped=False)
    r0 = rss()
    for k in sf.keys():
        assert float(sf.get(k)[-1, -1]) == 1.0
    assert rss() - r0 < 160 * 2**20  # at most about one tensor, not the 512 MiB read
