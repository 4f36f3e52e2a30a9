"""Every model Weightsmith writes goes through the one deterministic safetensors writer
(core/safe_io.py; docs/reliability.md: same inputs -> same bytes): a diffusers folder too, whose
weights files were written with ``safetensors.save_file`` (metadata in hash order) before."""

import json
import struct

import torch
from safetensors.torch import load_file

from weightsmith.core.model_io import load_model, save_edited_model


def _files(folder):
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _header(raw: bytes) -> dict:
    n = struct.unpack("<Q", raw[:8])[0]
    return json.loads(raw[8 : 8 + n])


def _edit(model):
    """A small edit of one UNet and one text-encoder weight (seeded)."""
    g = torch.Generator().manual_seed(3)
    names = [
        model.unet_cross_attention_names()[0] + ".to_k",
        "text_encoder.text_model.encoder.layers.0.self_attn.k_proj",
    ]
    return {n: 0.01 * torch.randn(model.weight(n).shape, generator=g) for n in names}


META = {"ws_method": "erasepro", "ws_targets": "cat", "ws_anchors": "dog", "ws_version": "test", "zeta": "1"}


def test_a_diffusers_folder_is_written_byte_identically_twice(tiny_models, tmp_path, diffusers_folder):
    src = diffusers_folder(tiny_models["sd1"], tmp_path / "model")
    model = load_model(src)
    deltas = _edit(model)
    a = save_edited_model(model, deltas, tmp_path / "a", metadata=META)
    b = save_edited_model(model, deltas, tmp_path / "b", metadata=META)
    fa, fb = _files(a), _files(b)
    assert sorted(fa) == sorted(fb) == sorted(_files(src))
    for name in fa:
        assert fa[name] == fb[name], name
    # the edited weights files carry the writer's sorted header: tensors and metadata in key order
    for comp in ("unet/diffusion_pytorch_model.safetensors", "text_encoder/model.safetensors"):
        h = _header(fa[comp])
        meta = h.pop("__metadata__")
        assert list(meta) == sorted(meta) and meta == {"format": "pt", **META}
        assert list(h) == sorted(h)
        assert fa[comp] != (src / comp).read_bytes()  # the edit is in it


def test_a_written_diffusers_folder_loads_back_as_base_plus_delta(tiny_models, tmp_path, diffusers_folder):
    src = diffusers_folder(tiny_models["sd1"], tmp_path / "model")
    model = load_model(src)
    deltas = _edit(model)
    out = save_edited_model(model, deltas, tmp_path / "edited", metadata=META)
    for comp, fname in (("unet", "diffusion_pytorch_model.safetensors"), ("text_encoder", "model.safetensors")):
        before, after = load_file(str(src / comp / fname)), load_file(str(out / comp / fname))
        assert sorted(before) == sorted(after)
        changed = {k for k in before if not torch.equal(before[k], after[k])}
        want = {n.partition(".")[2].removeprefix("text_model.") + ".weight" for n in deltas if n.startswith(comp + ".")}
        assert {k.removeprefix("text_model.") for k in changed} == want
        for n, d in deltas.items():
            if n.startswith(comp + "."):
                key = next(
                    k
                    for k in before
                    if k.removeprefix("text_model.") == n.partition(".")[2].removeprefix("text_model.") + ".weight"
                )
                assert torch.equal(after[key], before[key] + d), n
    again = load_model(out)  # and the library reads it back through from_pretrained
    for n, d in deltas.items():
        assert torch.equal(again.weight(n), model.weight(n) + d), n
