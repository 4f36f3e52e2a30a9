"""The Forge tab on a Flux.1 checkpoint, against the stand-in of Forge's patcher system and, when
``WEIGHTSMITH_FORGE_DIR`` names a Forge source folder, against Forge's own ``ModelPatcher``,
``LoraLoader`` and ``load_model_gpu`` (tests/a1111/fake_forge: its Flux engine holds the patchers
with Forge's Flux keys, ``diffusion_model.<BFL>``, ``clip_l.transformer.text_model…``,
``t5xxl.transformer.encoder…``). A tiny random Flux as a BFL transformer file plus CLIP-L and T5
files loaded beside it ("VAE / Text Encoder"): Apply puts base + ΔW on the weights a generation uses
(ΔW: the erasure computed from the files, host keys written out by hand here), Undo is bit-exact, Save
as LoRA writes the Flux LoRA + T5 file, Save as checkpoint the BFL layout (+ the edited T5 file), Merge
applies (concat), IterIS of one LoRA returns it. docs/flux.md says what this does not cover (Forge's
own Flux loader, model class and sampler)."""

import os
import sys
from pathlib import Path

import pytest
import torch
from forge_source import forge_source
from safetensors.torch import load_file

A1111 = Path(__file__).resolve().parent / "a1111"
PATHS = [str(A1111 / "fake_forge"), str(A1111 / "fake_webui")]
CTX, VEC = "transformer.context_embedder", "transformer.time_text_embed.text_embedder.linear_1"
ADV = {"expand_prompts": False}


def _purge():
    for m in [
        m for m in sys.modules if m.split(".")[0] in ("modules", "modules_forge", "networks", "forge_engine", "fake_sd")
    ]:
        del sys.modules[m]


@pytest.fixture(scope="module", params=["stand-in", pytest.param("forge's patcher", marks=pytest.mark.host)])
def forge(request, tmp_path_factory):
    """The stand-in of Forge's backend; with ``forge's patcher``, Forge's own ``ModelPatcher``,
    ``LoraLoader`` and ``load_model_gpu`` from the source folder ``WEIGHTSMITH_FORGE_DIR`` (skipped without
    it: Forge is AGPL-3.0 and not fetched here) hold the Flux engine's weights."""
    real = request.param != "stand-in"
    forge_dir = forge_source("backend/patcher/base.py", "docs/flux.md, 'What was verified how'") if real else None
    root = tmp_path_factory.mktemp("forgeflux")
    os.environ["WS_FAKE_WEBUI_ROOT"] = str(root)
    sys.path[:0] = PATHS
    _purge()
    import forge_engine
    from modules import processing, sd_models, shared

    if real:
        forge_engine.use_forge_patcher(forge_dir)
    forge_engine.install()
    Path(shared.cmd_opts.lora_dir).mkdir(parents=True, exist_ok=True)
    yield {"root": root, "shared": shared, "sd_models": sd_models, "processing": processing, "real": real}
    for p in PATHS:
        sys.path.remove(p)
    for m in forge_engine.forge_modules() if real else []:
        del sys.modules[m]
    _purge()


def host_key(name: str) -> str:
    if name == CTX:
        return "diffusion_model.txt_in.weight"
    if name == VEC:
        return "diffusion_model.vector_in.in_layer.weight"
    assert name.startswith("text_encoder_2.encoder.block.")
    return "t5xxl.transformer." + name.removeprefix("text_encoder_2.") + ".weight"


def _rel(a, b) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


@pytest.fixture(scope="module")
def flux(forge):
    from weightsmith.core.erase.options import EraseOptions
    from weightsmith.core.erase.pipeline import erase
    from weightsmith.core.flux_io import load_flux
    from weightsmith.core.lab.random_models import build_random_flux, write_random_flux

    rf = build_random_flux(0)
    ck, tes = write_random_flux(rf, Path(forge["sd_models"].model_path), "bfl")
    te_dir = forge["root"] / "models" / "text_encoder"
    te_dir.mkdir(parents=True, exist_ok=True)
    moved = []
    for f in tes:  # Forge lists text encoders under models/text_encoder
        (te_dir / f.name).write_bytes(f.read_bytes())
        f.unlink()
        moved.append(te_dir / f.name)
    ref = erase(load_flux(ck, moved), ["cat"], ["dog"], method="erasepro", options=EraseOptions(**ADV))
    base = {"diffusion_model." + k: v for k, v in load_file(str(ck)).items()}
    for f, pre in zip(moved, ("clip_l.transformer.", "t5xxl.transformer.")):
        base.update({pre + k: v for k, v in load_file(str(f)).items()})
    return {"ck": ck, "tes": moved, "ref": ref, "base": base}


def _gen(forge):
    """One generation: (text-encoder weights, UNet weights) as the stand-in's Flux engine used them."""
    c, _uc, unet = forge["processing"].txt2img("a photo of a cat", "")
    return {**c, **unet}


def test_flux_apply_undo_save_in_forge(forge, flux, tmp_path):
    from weightsmith.a1111_extension.backend import Workbench
    from weightsmith.a1111_extension.forge import ForgeBackend

    forge["sd_models"].select(flux["ck"], additional_modules=[str(p) for p in flux["tes"]])
    forge["shared"].sd_model = forge["sd_models"].FakeInitialModel()
    b = ForgeBackend()
    wb = Workbench(b)
    base = flux["base"]
    first = _gen(forge)
    assert all(torch.equal(first[k], v) for k, v in base.items())
    if forge["real"]:  # Forge's own classes hold the weights the generations read
        from backend.patcher.base import ModelPatcher as ForgeModelPatcher
        from backend.patcher.lora import LoraLoader as ForgeLoraLoader

        objs = forge["shared"].sd_model.forge_objects
        assert isinstance(objs.unet, ForgeModelPatcher) and isinstance(objs.clip.patcher, ForgeModelPatcher)
        assert isinstance(objs.unet.model.lora_loader, ForgeLoraLoader)
    edit = wb.compute_erase("cat", "dog", "", "erasepro", ADV)
    ref = flux["ref"]
    assert edit.family == "flux" and sorted(edit.deltas) == sorted(ref.deltas)
    edited = {host_key(n): d for n, d in ref.deltas.items()}
    assert any(k.startswith("t5xxl.") for k in edited) and "diffusion_model.txt_in.weight" in edited

    # Apply: every generation from now on uses base + ΔW; nothing else changes
    wb.apply(edit)
    for _ in range(2):
        got = _gen(forge)
        for k, v in base.items():
            if k in edited:
                assert _rel(got[k] - v, edited[k].reshape(v.shape)) <= 1e-5, k
            else:
                assert torch.equal(got[k], v), k
    # Undo: bit-exact
    wb.undo()
    got = _gen(forge)
    assert all(torch.equal(got[k], v) for k, v in base.items())

    # Save as LoRA: the Flux LoRA (transformer part) and the T5 file (base + ΔW, the file's own keys)
    msg = wb.save_lora(edit, "flux-erase")
    lora = Path(forge["shared"].cmd_opts.lora_dir) / "flux-erase.safetensors"
    t5f = lora.with_name("flux-erase_t5xxl.safetensors")
    assert lora.is_file() and t5f.is_file() and t5f.name in msg
    keys = set(load_file(str(lora)))
    assert keys == {f"{n}.lora_{x}.weight" for n in (CTX, VEC) for x in ("A", "B")}
    t5 = load_file(str(t5f))
    t5_base = load_file(str(flux["tes"][1]))
    assert sorted(t5) == sorted(t5_base)
    for k, v in t5_base.items():
        hk = "t5xxl.transformer." + k
        assert (_rel(t5[k] - v, edited[hk].reshape(v.shape)) <= 1e-5) if hk in edited else torch.equal(t5[k], v), k

    # Save as checkpoint: the input's layout (BFL file) + the edited T5 file beside it
    msg = wb.save_checkpoint(edit, "flux-erased")
    out = b.checkpoint_dir() / "flux-erased.safetensors"
    assert out.is_file() and str(out) in msg
    tr = load_file(str(out))
    for k, v in load_file(str(flux["ck"])).items():
        hk = "diffusion_model." + k
        assert (_rel(tr[k] - v, edited[hk].reshape(v.shape)) <= 1e-5) if hk in edited else torch.equal(tr[k], v), k
    side = load_file(str(out.with_name("flux-erased.t5xxl.safetensors")))
    for k, v in t5_base.items():
        hk = "t5xxl.transformer." + k
        assert (_rel(side[k] - v, edited[hk].reshape(v.shape)) <= 1e-5) if hk in edited else torch.equal(side[k], v)

    # Merge on Flux: concat of the saved LoRA with weight 2 = twice its ΔW (the LoRA file holds the
    # transformer part; T5 came as a file); applied, a generation uses base + 2ΔW; Undo bit-exact
    merged, _ = wb.compute_merge(["flux-erase.safetensors"], "2", "", "concat")
    assert sorted(merged.deltas) == sorted(n for n in ref.deltas if not n.startswith("text_encoder_2."))
    wb.apply(merged)
    got = _gen(forge)
    for k, v in base.items():
        hk_edit = {host_key(n): 2 * ref.deltas[n] for n in merged.deltas}
        if k in hk_edit:
            assert _rel(got[k] - v, hk_edit[k].reshape(v.shape)) <= 1e-5, k
        else:
            assert torch.equal(got[k], v), k
    wb.undo()
    assert all(torch.equal(a, base[k]) for k, a in _gen(forge).items() if k in base)
    # IterIS on Flux (Forge's CPU defaults: core's quick settings), sampled from the weights Forge holds: a
    # one-LoRA merge returns that LoRA
    it, _ = wb.compute_merge(["flux-erase.safetensors"], "", "a cat in a garden", "iteris")
    assert sorted(it.deltas) == sorted(merged.deltas) and it.report["family"] == "flux"
    for n in it.deltas:
        assert _rel(it.deltas[n], ref.deltas[n]) <= 1e-4, n


def test_sd_edit_on_flux_engine_is_refused(forge, flux):
    """An edit for another family changes nothing on the Flux engine."""
    from weightsmith.a1111_extension.forge import ForgeBackend
    from weightsmith.core.edit import Edit
    from weightsmith.core.errors import WeightsmithError

    forge["sd_models"].select(flux["ck"], additional_modules=[str(p) for p in flux["tes"]])
    b = ForgeBackend()
    _gen(forge)
    sm = forge["shared"].sd_model
    before = sm.forge_objects_original.unet
    with pytest.raises(WeightsmithError, match="this edit is for"):
        b._install(sm, Edit("sd1", {}, {"unet.x": torch.zeros(1)}, {}, {}))
    assert sm.forge_objects_original.unet is before
