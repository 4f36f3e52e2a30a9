"""The Forge backend against a stand-in of Forge's patcher system (tests/a1111/fake_forge, see its
README): Apply through ``forge_objects_original`` survives LoRA changes and engine rebuilds and gives
what the same checkpoint with the edit baked in gives (conds and UNet weights, LoRA stacked on top);
Undo is bit-exact; Apply before the first generation lands at the lazy load; another checkpoint
never gets the edit; refusals change nothing."""

import os
import sys
from pathlib import Path

import pytest
import torch

A1111 = Path(__file__).resolve().parent / "a1111"
PATHS = [str(A1111 / "fake_forge"), str(A1111 / "fake_webui")]
PROMPT = "a photo of a cat"
ERASE_ADV = {"expand_prompts": False, "max_pad": 3}


def _purge():
    for m in [
        m for m in sys.modules if m.split(".")[0] in ("modules", "modules_forge", "networks", "forge_engine", "fake_sd")
    ]:
        del sys.modules[m]


@pytest.fixture(scope="module")
def forge(tmp_path_factory):
    root = tmp_path_factory.mktemp("forge")
    os.environ["WS_FAKE_WEBUI_ROOT"] = str(root)
    sys.path[:0] = PATHS
    _purge()
    import forge_engine
    import networks
    from modules import processing, sd_models, shared

    forge_engine.install()
    Path(shared.cmd_opts.lora_dir).mkdir(parents=True, exist_ok=True)
    yield {
        "root": root,
        "shared": shared,
        "sd_models": sd_models,
        "processing": processing,
        "engine": forge_engine,
        "networks": networks,
    }
    for p in PATHS:
        sys.path.remove(p)
    _purge()


def _checkpoint(forge, family, name="base"):
    from weightsmith.core.lab.random_models import build_random_model
    from weightsmith.core.model_io import save_single_file

    m = build_random_model(family, "tiny", seed=3)
    ck = Path(forge["sd_models"].model_path) / f"{name}-{family}.safetensors"
    ck.parent.mkdir(parents=True, exist_ok=True)
    if not ck.exists():
        save_single_file(m, ck)
    forge["engine"].TOKENIZER = m.tokenizers["text_encoder"]
    os.environ["WEIGHTSMITH_TOKENIZER"] = str(m.tokenizers["text_encoder"].name_or_path)  # the tab's loader
    return m, ck


def _start(forge, ck, initial=True):
    """Pick ``ck`` at the top of the page (Forge loads it at the first generation)."""
    forge["sd_models"].select(ck)
    if initial:
        forge["shared"].sd_model = forge["sd_models"].FakeInitialModel()


def _copy(forge, ck, name):
    """The same checkpoint file under another name (another checkpoint for Forge)."""
    other = Path(forge["sd_models"].model_path) / name
    other.write_bytes(ck.read_bytes())
    return other


def _erase_applied(forge):
    """SD1 loaded by a first generation, with a UCE erasure applied: (model, checkpoint, backend, workbench)."""
    m, ck = _checkpoint(forge, "sd1")
    _start(forge, ck)
    b, wb = _backend()
    _gen(forge)
    wb.apply(wb.compute_erase("cat", "dog", "", "uce", ERASE_ADV))
    return m, ck, b, wb


def _backend():
    from weightsmith.a1111_extension.backend import Workbench
    from weightsmith.a1111_extension.forge import ForgeBackend

    b = ForgeBackend()
    return b, Workbench(b)


def _kohya(model, path, seed=7, scale=0.05):
    """A random kohya LoRA on a UNet cross-attention and a text-encoder projection."""
    from weightsmith.core.edit import Edit
    from weightsmith.core.lora_write import save_lora

    attn = model.unet_cross_attention_names()[0]
    names = [f"{attn}.to_k", f"{attn}.to_v"]
    te = sorted(model.text_encoders)[0]
    names.append(f"{te}.text_model.encoder.layers.0.self_attn.q_proj")
    g = torch.Generator().manual_seed(seed)
    deltas, factors = {}, {}
    for n in names:
        W = model.weight(n)
        up, down = torch.randn(W.shape[0], 2, generator=g) * scale, torch.randn(2, W.shape[1], generator=g) * scale
        deltas[n], factors[n] = up @ down, (up, down)
    save_lora(Edit(model.family, dict(model.unet_config), deltas, factors, {"method": "test"}), path)


def _te_edit(model, seed=11, scale=0.05):
    """A random change of every text encoder's first-layer attention projections."""
    from weightsmith.core.edit import Edit

    g = torch.Generator().manual_seed(seed)
    deltas = {}
    for te in sorted(model.text_encoders):
        for p in ("q_proj", "out_proj"):
            n = f"{te}.text_model.encoder.layers.0.self_attn.{p}"
            deltas[n] = torch.randn(model.weight(n).shape, generator=g) * scale
    return Edit(model.family, dict(model.unet_config), deltas, {}, {"method": "test"})


def _gen(forge, loras=()):
    return forge["processing"].txt2img(PROMPT, "", loras=loras)


def _close(a, b, tol=1e-5):
    return all(torch.allclose(a[k].float(), b[k].float(), atol=tol, rtol=1e-5) for k in a)


@pytest.mark.parametrize("family", ["sd1", "sd2", "sdxl"])
def test_apply_is_the_baked_checkpoint_under_lora_changes_and_undo_is_exact(forge, family, tmp_path):
    from weightsmith.core.model_io import load_model, save_edited_model

    m, ck = _checkpoint(forge, family)
    lora = f"l-{family}.safetensors"
    _kohya(m, Path(forge["shared"].cmd_opts.lora_dir) / lora)
    _start(forge, ck)
    b, wb = _backend()
    edit = wb.compute_erase("cat", "dog", "", "uce", ERASE_ADV)  # UNet cross-attention k/v
    te_edit = _te_edit(m)  # and a text-encoder change
    assert edit.deltas and te_edit.deltas

    # the reference: the same checkpoint with both edits written into it, loaded and used by Forge
    baked = Path(forge["sd_models"].model_path) / f"baked-{family}.safetensors"
    save_edited_model(load_model(ck, tokenizer=forge["engine"].TOKENIZER), edit.then(te_edit).deltas, baked)
    _start(forge, baked, initial=False)
    ref_c, _, ref_w = _gen(forge)
    ref_lc, _, ref_lw = _gen(forge, [(lora, 1.0, 1.0)])

    _start(forge, ck, initial=False)
    base_c, _, base_w = _gen(forge)
    assert not torch.allclose(base_c, ref_c, atol=1e-4)
    wb.apply(edit)
    wb.apply(te_edit)  # applied on top: the host holds their sum
    assert b.installed_on is forge["shared"].sd_model
    c, _, w = _gen(forge)  # the same prompt: the cond cache was emptied
    assert torch.allclose(c, ref_c, atol=1e-5) and _close(w, ref_w)
    assert sorted(k for k in w if not torch.equal(w[k], base_w[k]))  # the UNet changed
    c, _, w = _gen(forge, [(lora, 1.0, 1.0)])  # a LoRA added: stacked on the edited weights
    assert torch.allclose(c, ref_lc, atol=1e-5) and _close(w, ref_lw)
    c, _, w = _gen(forge)  # and removed again: the edit is still there
    assert torch.allclose(c, ref_c, atol=1e-5) and _close(w, ref_w)

    assert wb.undo().startswith("Undone")
    c, _, w = _gen(forge)
    assert torch.equal(c, base_c) and all(torch.equal(w[k], base_w[k]) for k in base_w)
    c, _, w = _gen(forge, [(lora, 1.0, 1.0)])  # LoRA alone after Undo: no trace of the edit
    c0, _, _ = _gen(forge)
    assert torch.equal(c0, base_c)


def test_apply_before_the_first_generation_lands_at_load_and_follows_rebuilds_only(forge):
    m, ck = _checkpoint(forge, "sd1")
    _start(forge, ck)  # nothing loaded yet (Forge loads lazily)
    b, wb = _backend()
    edit = wb.compute_erase("cat", "dog", "", "uce", ERASE_ADV)
    wb.apply(edit)
    assert b.installed_on is None and wb.applied is not None
    c1, _, w1 = _gen(forge)  # loads the engine; the callback installs the edit
    first = forge["shared"].sd_model
    assert b.installed_on is first
    forge["sd_models"].model_data.forge_hash = ""  # e.g. a setting changed: a new engine, same checkpoint
    c2, _, w2 = _gen(forge)
    assert forge["shared"].sd_model is not first and b.installed_on is forge["shared"].sd_model
    assert torch.equal(c1, c2) and all(torch.equal(w1[k], w2[k]) for k in w1)

    _start(forge, _copy(forge, ck, "other-sd1.safetensors"), initial=False)  # another checkpoint: never edited
    c3, _, w3 = _gen(forge)
    _start(forge, ck, initial=False)
    forge["sd_models"].model_data.forge_hash = ""
    b.forget()  # (as if the tab had noticed the switch)
    c4, _, w4 = _gen(forge)
    assert torch.equal(c3, c4) and all(torch.equal(w3[k], w4[k]) for k in w3)
    assert not all(torch.equal(w3[k], w1[k]) for k in w1)  # UCE changes the UNet only


def test_switching_checkpoint_drops_the_edit_with_a_message(forge):
    from weightsmith.core.errors import WeightsmithError

    m, ck, b, wb = _erase_applied(forge)
    _start(forge, _copy(forge, ck, "other2-sd1.safetensors"), initial=False)
    _gen(forge)
    with pytest.raises(WeightsmithError, match="loaded model changed"):
        wb.undo()
    assert wb.applied is None and b.installed_on is None


def test_refusals_change_nothing(forge):
    from weightsmith.core.edit import Edit
    from weightsmith.core.errors import WeightsmithError

    m, ck = _checkpoint(forge, "sd1")
    _start(forge, ck)
    b, wb = _backend()
    _, _, w0 = _gen(forge)
    sm = forge["shared"].sd_model
    orig = (sm.forge_objects_original.unet, sm.forge_objects_original.clip)
    n = m.unet_cross_attention_names()[0] + ".to_k"
    wrong = Edit("sd1", dict(m.unet_config), {n: torch.zeros(3, 5)}, {}, {"method": "test"})
    with pytest.raises(WeightsmithError, match="computed for another model"):
        wb.apply(wrong)
    sdxl = Edit("sdxl", dict(m.unet_config), {n: torch.zeros_like(m.weight(n))}, {}, {"method": "test"})
    with pytest.raises(WeightsmithError, match="SDXL"):
        wb.apply(sdxl)
    assert (sm.forge_objects_original.unet, sm.forge_objects_original.clip) == orig and wb.applied is None
    forge["sd_models"].select(ck, ["/models/text_encoder/t5xxl.safetensors"])
    with pytest.raises(WeightsmithError, match="separate text encoder"):
        wb.apply(Edit("sd1", dict(m.unet_config), {n: torch.zeros_like(m.weight(n))}, {}, {"method": "test"}))
    _start(forge, ck, initial=False)
    _, _, w = _gen(forge)
    assert all(torch.equal(w[k], w0[k]) for k in w0)


def test_conv_deltas_are_reshaped_to_the_parameter(forge):
    """Forge skips a "diff" patch of another shape with a printed warning only: a conv ΔW held 2-D
    must arrive as the 4-D weight it changes."""
    from weightsmith.core.edit import Edit
    from weightsmith.core.naming import UNetLayout, comfy_key

    m, ck = _checkpoint(forge, "sd1")
    _start(forge, ck)
    b, wb = _backend()
    _, _, w0 = _gen(forge)
    conv = next(
        "unet." + n
        for n, mod in m.unet.named_modules()
        if isinstance(mod, torch.nn.Conv2d) and mod.kernel_size == (3, 3)
    )
    W = m.weight(conv)
    d = torch.randn(W.shape[0], W[0].numel(), generator=torch.Generator().manual_seed(1)) * 0.01
    wb.apply(Edit("sd1", dict(m.unet_config), {conv: d}, {}, {"method": "test"}))
    _, _, w = _gen(forge)
    key = comfy_key(conv + ".weight", "sd1", UNetLayout.from_config(m.unet_config))
    assert torch.allclose(w[key], w0[key] + d.reshape(W.shape), atol=1e-7)
    wb.undo()
    _, _, w = _gen(forge)
    assert torch.equal(w[key], w0[key])


def test_save_as_lora_with_the_edit_applied_refreshes_forges_list(forge):
    m, ck, b, wb = _erase_applied(forge)
    before = forge["networks"].listed
    msg = wb.save_lora(wb.applied, "forge-edit")
    assert msg.startswith("Saved LoRA") and forge["networks"].listed == before + 1
    assert (Path(forge["shared"].cmd_opts.lora_dir) / "forge-edit.safetensors").is_file()
    wb.undo()


def test_a_lora_saved_again_under_a_path_forge_has_read_is_read_again(forge):
    """Forge caches LoRA files by path and re-stacks only when the set of paths changes: a LoRA the
    tab writes under a path Forge has read before (deleted, then saved again) must give its new weights."""
    m, ck, b, wb = _erase_applied(forge)
    first = wb.applied
    wb.undo()
    name = "again"
    path = Path(forge["shared"].cmd_opts.lora_dir) / f"{name}.safetensors"
    assert wb.save_lora(first, name).startswith("Saved LoRA")
    tags = [(f"{name}.safetensors", 1.0, 1.0)]
    _, _, w_first = _gen(forge, tags)
    path.unlink()
    other = wb.compute_erase("cat", "bird", "", "uce", ERASE_ADV)
    assert wb.save_lora(other, name).startswith("Saved LoRA")
    _, _, w_saved = _gen(forge, tags)  # the same prompt and tags right after the save
    # the reference: what this Forge gives with nothing cached (cache emptied, LoRA stack rebuilt)
    forge["networks"].load_lora_state_dict.cache_clear()
    forge["shared"].sd_model.current_lora_hash = None
    _, _, w_fresh = _gen(forge, tags)
    assert all(torch.equal(w_saved[k], w_fresh[k]) for k in w_fresh)
    assert any(not torch.equal(w_saved[k], w_first[k]) for k in w_first)


def _half_file(ck, out, dtype=torch.float16, keep_one_float32=False):
    """``ck`` with every UNet weight matrix / kernel stored in ``dtype`` (the usual download format)."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(ck), framework="pt") as f:
        meta, sd = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    unet = [k for k in sd if k.startswith("model.diffusion_model.") and sd[k].dim() >= 2]
    for k in unet[1 if keep_one_float32 else 0 :]:
        sd[k] = sd[k].to(dtype)
    save_file(sd, str(out), metadata=meta)
    return out


def test_an_sdxl_file_in_half_precision_is_held_in_it_beside_forge_with_the_same_results(forge):
    """SDXL beside Forge's own copy: the UNet is held in the file's fp16 (half the memory), and what
    the tab computes from it (an erasure, an IterIS merge that runs the UNet) equals bit for bit what
    a float32 model of the same file gives; SD1 and mixed-precision files stay float32."""
    from weightsmith.core.model_io import beside_host_weights_dtype, load_model, stored_half_dtype

    m, ck32 = _checkpoint(forge, "sdxl")
    d = Path(forge["sd_models"].model_path)
    ck = _half_file(ck32, d / "half-sdxl.safetensors")
    assert stored_half_dtype(ck) is torch.float16 and beside_host_weights_dtype(ck) is torch.float16
    assert stored_half_dtype(ck32) is None and beside_host_weights_dtype(ck32) is None
    mixed = _half_file(ck32, d / "mixed-sdxl.safetensors", keep_one_float32=True)
    assert stored_half_dtype(mixed) is None
    _, ck1 = _checkpoint(forge, "sd1")
    half1 = _half_file(ck1, d / "half-sd1.safetensors", torch.bfloat16)
    assert stored_half_dtype(half1) is torch.bfloat16 and beside_host_weights_dtype(half1) is None

    for i in range(2):
        _kohya(m, Path(forge["shared"].cmd_opts.lora_dir) / f"h{i}.safetensors", seed=20 + i, scale=0.2)
    _start(forge, ck)
    b, wb = _backend()
    held = b.model()
    lin = [mod for mod in held.unet.modules() if isinstance(mod, torch.nn.Linear)]
    assert lin and all(mod.weight.dtype is torch.float16 for mod in lin)

    ref_model = load_model(ck, tokenizer=forge["engine"].TOKENIZER)  # float32, the file's values
    assert all(p.dtype is torch.float32 for p in ref_model.unet.parameters())
    ref = _workbench_on(ref_model, b)
    edit, ref_edit = (w.compute_erase("cat", "dog", "", "erasepro", ERASE_ADV) for w in (wb, ref))
    assert edit.deltas.keys() == ref_edit.deltas.keys()
    assert all(torch.equal(edit.deltas[n], ref_edit.deltas[n]) for n in edit.deltas)
    settings = {"iterations": 1, "samples": 1, "steps": 1, "seed": 0, "evaluate_final": False}
    (merged, _), (ref_merged, _) = (
        w.compute_merge(["h0.safetensors", "h1.safetensors"], "", "a cat\na dog", "iteris", dict(settings))
        for w in (wb, ref)
    )
    unet = [n for n in merged.deltas if n.startswith("unet")]
    assert unet and merged.deltas.keys() == ref_merged.deltas.keys()
    assert all(torch.equal(merged.deltas[n], ref_merged.deltas[n]) for n in merged.deltas)
    # and the float32 model really differs from one rounded further: the comparison can fail
    assert not torch.equal(ref_model.weight(unet[0]), ref_model.weight(unet[0]).bfloat16().float())


def _workbench_on(model, like):
    """A workbench computing on ``model`` with ``like``'s LoRA folder (the float32 reference)."""
    from weightsmith.a1111_extension.backend import StandaloneBackend, Workbench

    sb = StandaloneBackend(model.source.path, like.lora_dir(), like.checkpoint_dir())
    sb._model = model
    return Workbench(sb)
