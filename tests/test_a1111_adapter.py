"""The A1111 adapter against a stand-in of A1111 v1.10's modules.* and its Lora extension
(tests/a1111/fake_webui, see its README): model reading, Apply/Undo next to active LoRAs (SD1,
SD2 fused in_proj, SDXL two embedders), Save as checkpoint/LoRA, refusals and Interrupt."""

import os
import sys
from pathlib import Path

import pytest
import torch

FAKE = Path(__file__).resolve().parent / "a1111" / "fake_webui"


@pytest.fixture(scope="module")
def webui(tmp_path_factory):
    root = tmp_path_factory.mktemp("webui")
    os.environ["WS_FAKE_WEBUI_ROOT"] = str(root)
    sys.path.insert(0, str(FAKE))
    for m in [m for m in sys.modules if m == "modules" or m.startswith("modules.") or m == "networks"]:
        del sys.modules[m]
    import networks
    from modules import sd_models, shared

    yield {"root": root, "shared": shared, "sd_models": sd_models, "networks": networks}
    sys.path.remove(str(FAKE))
    for m in [m for m in sys.modules if m == "modules" or m.startswith("modules.") or m == "networks"]:
        del sys.modules[m]


def _model(family):
    """A tiny random model; SD1/SD2 with 2 resnets per level so A1111's fixed kohya UNet index
    arithmetic (3 blocks per level) holds, as it does for real SD models."""
    from diffusers import UNet2DConditionModel

    from weightsmith.core.lab.random_models import build_random_model

    m = build_random_model(family, "tiny", seed=3)
    if family != "sdxl":
        cfg = {k: v for k, v in dict(m.unet.config).items() if not k.startswith("_")}
        cfg["layers_per_block"] = 2
        torch.manual_seed(4)
        unet = UNet2DConditionModel(**cfg).eval().requires_grad_(False)
        m._unet, m.unet_config, m.unet_loader = unet, dict(unet.config), (lambda: unet)
    return m


def _load(webui, family, unet_dtype=torch.float32):
    import fake_sd

    from weightsmith.core.model_io import save_single_file, to_ldm_state_dict

    m = _model(family)
    ck = Path(webui["sd_models"].model_path) / f"base-{family}.safetensors"
    if not ck.exists():
        save_single_file(m, ck)
    heads = {c: t.config.num_attention_heads for c, t in m.text_encoders.items()}
    enc = dict(m.text_encoders)
    enc["tokenizer"] = m.tokenizers["text_encoder"]
    if family == "sd2":  # A1111's SD2 embedder has open_clip's tokenizer: we read CLIP's BPE from disk
        os.environ["WEIGHTSMITH_TOKENIZER"] = str(m.tokenizers["text_encoder"].name_or_path)
    sm = fake_sd.build_sd_model(family, to_ldm_state_dict(m), enc, heads, ck, unet_dtype)
    webui["shared"].sd_model = sm
    webui["networks"].loaded_networks.clear()
    return m, sm, ck


def _backend():
    from weightsmith.a1111_extension.a1111 import A1111Backend
    from weightsmith.a1111_extension.backend import Workbench

    b = A1111Backend()
    return b, Workbench(b)


ERASE_ADV = {"expand_prompts": False, "max_pad": 3}


def _kohya(edit_names, model, path, seed, scale=0.05):
    """A random kohya LoRA on the given canonical modules (written by core, read by the stand-in)."""
    from weightsmith.core.edit import Edit
    from weightsmith.core.lora_write import save_lora

    g = torch.Generator().manual_seed(seed)
    deltas, factors = {}, {}
    for n in edit_names:
        W = model.weight(n)
        up = torch.randn(W.shape[0], 2, generator=g) * scale
        down = torch.randn(2, W.shape[1], generator=g) * scale
        deltas[n], factors[n] = up @ down, (up, down)
    e = Edit(model.family, dict(model.unet_config), deltas, factors, {"method": "test"})
    save_lora(e, path)
    return e


def _activate(webui, *paths):
    from safetensors.torch import load_file

    nets = []
    for p in paths:
        net, failed = webui["networks"].load_network(Path(p).stem, load_file(str(p)))
        assert not failed, f"stand-in Lora extension could not match {list(failed)[:3]}"
        nets.append(net)
    webui["networks"].loaded_networks[:] = nets
    webui["networks"].generate()


def _te_attn_names(model, comp, layer=0):
    return [
        f"{comp}.text_model.encoder.layers.{layer}.self_attn.{p}" for p in ("q_proj", "k_proj", "v_proj", "out_proj")
    ]


def _live(backend, name):
    """The live tensor slice for a canonical weight, as A1111 would compute with it now."""
    s = backend.slots([name])[name]
    t = getattr(s.module, s.param)
    return (t[s.rows[0] : s.rows[1]] if s.rows else t).detach().float().clone()


@pytest.mark.parametrize("family", ["sd1", "sd2", "sdxl"])
def test_live_model_reads_like_the_checkpoint(webui, family):
    """The SDModel built from the live modules encodes exactly like the original model, and reads
    the LoRA-free weights while a LoRA is applied."""
    m, sm, ck = _load(webui, family)
    b, _ = _backend()
    lm = b.model()
    assert lm.family == family
    from weightsmith.core.model_io import load_model

    ref = load_model(ck, tokenizer=m.tokenizers["text_encoder"])  # core's own checkpoint reader
    p = ["a red circle", "van gogh"]
    a, r = lm.encode(p), ref.encode(p)
    assert torch.allclose(a.context, r.context, atol=1e-5)
    if family == "sdxl":
        assert torch.allclose(a.pooled, r.pooled, atol=1e-5)
    n = m.unet_cross_attention_names()[0] + ".to_k"
    assert torch.equal(lm.weight(n), m.weight(n))
    comp = "text_encoder_2" if family == "sdxl" else "text_encoder"
    names = _te_attn_names(m, comp) + [n]
    _kohya(names, m, webui["root"] / f"l1-{family}.safetensors", 1)
    _activate(webui, webui["root"] / f"l1-{family}.safetensors")
    assert not torch.allclose(_live(b, n), m.weight(n))  # the LoRA is in the live weights
    b.weights_changed()
    lm2 = b.model()
    for k in names:
        assert torch.equal(lm2.weight(k), m.weight(k)), k  # ...but we read the restored base


@pytest.mark.parametrize("family", ["sd1", "sd2", "sdxl"])
def test_float32_live_weights_are_read_without_a_second_copy(webui, family):
    """Where the web UI holds float32 CPU weights (A1111 on a CPU), the model the tab computes with
    is views of them (an SDXL copy would be another ~14 GB); fp16 live weights are converted to a
    float32 copy instead, and neither changes a live tensor."""
    m, sm, ck = _load(webui, family)
    live = {p.untyped_storage().data_ptr() for p in sm.parameters()}
    before = {k: v.clone() for k, v in sm.state_dict().items()}
    b, _ = _backend()
    lm = b.model()
    ours = list(lm.unet.named_parameters())
    for c, te in lm.text_encoders.items():
        ours += [(f"{c}.{n}", p) for n, p in te.named_parameters()]
    assert len(ours) > 50
    own = [n for n, p in ours if p.untyped_storage().data_ptr() not in live]
    assert not own, f"{len(own)} of {len(ours)} parameters copied, e.g. {own[:3]}"
    from weightsmith.core.model_io import load_model

    ref = load_model(ck, tokenizer=m.tokenizers["text_encoder"])  # the views read as the checkpoint
    p = ["a red circle", "van gogh"]
    assert torch.allclose(lm.encode(p).context, ref.encode(p).context, atol=1e-5)
    r = dict(ref.unet.named_parameters())  # (a live model's UNet config is inferred as for real SD
    for n, p_ in lm.unet.named_parameters():  # sizes, so compare the weights, not this tiny UNet's output)
        assert torch.equal(p_, r[n]), n
    b.idle()
    for k, v in sm.state_dict().items():
        assert torch.equal(v, before[k]), k
    m16, sm16, _ = _load(webui, family, unet_dtype=torch.float16)
    live16 = {p.untyped_storage().data_ptr() for p in sm16.model.diffusion_model.parameters()}
    b16, _ = _backend()
    u = b16.model().unet
    assert all(p.dtype == torch.float32 and p.untyped_storage().data_ptr() not in live16 for p in u.parameters())


@pytest.mark.parametrize("family,dtype", [("sd1", torch.float16), ("sd2", torch.float32), ("sdxl", torch.float32)])
def test_apply_survives_lora_changes_and_undo_is_exact(webui, family, dtype):
    m, sm, ck = _load(webui, family, unet_dtype=dtype)
    b, wb = _backend()
    comp = "text_encoder_2" if family == "sdxl" else "text_encoder"
    unet_n = m.unet_cross_attention_names()[0] + ".to_k"
    watch = _te_attn_names(m, comp) + [unet_n]
    l1 = _kohya(watch, m, webui["root"] / f"a-{family}.safetensors", 11)
    l2 = _kohya(watch, m, webui["root"] / f"b-{family}.safetensors", 12)
    base = {n: _live(b, n) for n in watch}
    _activate(webui, webui["root"] / f"a-{family}.safetensors")

    edit = wb.compute_erase("cat", "dog", "", "erasepro", ERASE_ADV)
    assert edit.family == family and any(k.startswith(comp) for k in edit.deltas)
    wb.apply(edit)

    def expect(with_edit, lora):
        out = {}
        for n in watch:
            w = base[n].to(dtype if n.startswith("unet") else torch.float32)
            if with_edit and n in edit.deltas:
                w = (w.float() + edit.deltas[n]).to(w.dtype)
            if lora is not None:
                w = w.float() + lora.deltas[n]
            out[n] = w.float()
        return out

    def check(want, exact=False):
        webui["networks"].generate()
        for n in watch:
            got = _live(b, n)
            if exact:
                assert torch.equal(got, want[n]), n
            else:
                tol = 2e-3 if (dtype == torch.float16 and n.startswith("unet")) else 1e-5
                assert torch.allclose(got, want[n], atol=tol), (n, float((got - want[n]).abs().max()))

    check(expect(True, l1))  # edit + active LoRA, LoRA applied once
    _activate(webui, webui["root"] / f"b-{family}.safetensors")
    check(expect(True, l2))  # LoRA set changed: edit kept, new LoRA once
    _activate(webui)
    check(expect(True, None), exact=True)  # no LoRA: exactly base + ΔW
    _activate(webui, webui["root"] / f"a-{family}.safetensors")
    msg = wb.undo()
    assert "restored" in msg
    check(expect(False, l1))  # undo under an active LoRA: base + LoRA
    _activate(webui)
    check(expect(False, None), exact=True)  # bit-exact originals
    for mod in sm.modules():  # ...in the Lora extension's backups too
        wbk = getattr(mod, "network_weights_backup", None)
        if wbk is not None:
            cur = mod.in_proj_weight if isinstance(mod, torch.nn.MultiheadAttention) else mod.weight
            assert torch.equal(wbk[0] if isinstance(wbk, tuple) else wbk, cur.detach().cpu())


def test_apply_without_lora_then_lora_then_undo(webui):
    """Edit first (no backups exist yet), LoRA afterwards: the extension's backup takes the edited
    weight; Undo must fix that backup too."""
    m, sm, ck = _load(webui, "sd1")
    b, wb = _backend()
    n = m.unet_cross_attention_names()[-1] + ".to_v"
    base = _live(b, n)
    edit = wb.compute_erase("cat", "dog", "", "uce", ERASE_ADV)
    wb.apply(edit)
    assert torch.allclose(_live(b, n), base + edit.deltas[n], atol=1e-6)
    l1 = _kohya([n], m, webui["root"] / "c.safetensors", 21)
    _activate(webui, webui["root"] / "c.safetensors")
    assert torch.allclose(_live(b, n), base + edit.deltas[n] + l1.deltas[n], atol=1e-5)
    wb.undo()
    webui["networks"].generate()
    assert torch.allclose(_live(b, n), base + l1.deltas[n], atol=1e-5)
    _activate(webui)
    assert torch.equal(_live(b, n), base)


@pytest.mark.parametrize("family", ["sd1", "sd2", "sdxl"])
def test_save_checkpoint_and_lora(webui, family):
    from weightsmith.core.model_io import load_model
    from weightsmith.core.tokenizer import build_word_tokenizer

    m, sm, ck = _load(webui, family)
    b, wb = _backend()
    edit = wb.compute_erase("cat", "dog", "", "erasepro", ERASE_ADV)
    msg = wb.save_checkpoint(edit, f"erased-{family}")
    out = Path(webui["sd_models"].model_path) / f"erased-{family}.safetensors"
    assert out.exists() and str(out) in msg
    assert any(i.filename == str(out) for i in webui["sd_models"].checkpoints_list.values())
    saved = load_model(out, tokenizer=build_word_tokenizer())
    for n, d in edit.deltas.items():
        assert torch.allclose(saved.weight(n), m.weight(n) + d, atol=1e-5), n
    q = _te_attn_names(m, "text_encoder_2" if family == "sdxl" else "text_encoder")[0]
    assert torch.equal(saved.weight(q), m.weight(q))  # q rows of a fused in_proj untouched

    # Save as LoRA, then load it with the stand-in Lora extension on the unedited model
    wb.save_lora(edit, f"erase-{family}")
    lora = Path(webui["shared"].cmd_opts.lora_dir) / f"erase-{family}.safetensors"
    assert lora.exists()
    watch = [n for n in edit.deltas][:3] + [n for n in edit.deltas if n.startswith("unet")][:2]
    base = {n: _live(b, n) for n in watch}
    _activate(webui, lora)  # asserts every key matched a layer
    for n in watch:  # fused MHA applied too (q/k/v/out all present)
        assert torch.allclose(_live(b, n), base[n] + edit.deltas[n], atol=1e-5), n
    _activate(webui)


def test_refuses_unsupported_models(webui):
    from weightsmith.core.errors import WeightsmithError

    m, sm, ck = _load(webui, "sdxl")
    b, wb = _backend()
    sm.conditioner.embedders = torch.nn.ModuleList([sm.conditioner.embedders[1], sm.conditioner.embedders[2]])
    with pytest.raises(WeightsmithError, match="refiner"):
        b.model()
    sm.is_sd3 = True
    with pytest.raises(WeightsmithError, match="SD3"):
        b.model()
    webui["shared"].sd_model = None
    with pytest.raises(WeightsmithError, match="no model is loaded"):
        wb.compute_erase("cat", "dog", "", "uce", ERASE_ADV)


def test_interrupt_stops_and_changes_nothing(webui):
    from weightsmith.core.errors import CancelledError

    m, sm, ck = _load(webui, "sd1")
    b, wb = _backend()
    state = webui["shared"].state

    class Interrupting(type(state)):
        def __setattr__(self, k, v):
            super().__setattr__(k, v)
            if k == "sampling_step" and v >= 2:
                self.interrupt()  # the user presses Interrupt mid-job

    webui["shared"].state = Interrupting()
    try:
        n = m.unet_cross_attention_names()[0] + ".to_k"
        before = _live(b, n)
        with pytest.raises(CancelledError):
            wb.compute_erase("cat", "dog", "", "erasepro", ERASE_ADV)
        assert wb.applied is None and torch.equal(_live(b, n), before)
        assert webui["shared"].state.job == ""  # state.end() ran
    finally:
        webui["shared"].state = state


def test_reloaded_weights_are_not_overwritten_by_undo(webui):
    from weightsmith.core.errors import WeightsmithError

    m, sm, ck = _load(webui, "sd1")
    b, wb = _backend()
    edit = wb.compute_erase("cat", "dog", "", "uce", ERASE_ADV)
    wb.apply(edit)
    n = next(iter(edit.deltas))
    s = b.slots([n])[n]
    with torch.no_grad():  # A1111 reloads other weights into the same model
        getattr(s.module, s.param).add_(1.0)
    with pytest.raises(WeightsmithError, match="replaced"):
        wb.undo()
    assert wb.applied is None


@pytest.mark.parametrize("family", ["sd1", "sd2", "sdxl"])
def test_hijacked_token_embedding_reads_as_the_checkpoint_key(webui, family):
    """A1111's sd_hijack puts every token embedding under EmbeddingsWithFixes (``….wrapped.weight``
    live); the tab still reads it as the checkpoint's ``…token_embedding.weight``."""
    m, sm, ck = _load(webui, family)
    wrapped = [n for n, mod in sm.named_modules() if type(mod).__name__ == "EmbeddingsWithFixes"]
    assert len(wrapped) == (2 if family == "sdxl" else 1), wrapped
    live = {n for n, _ in sm.named_parameters()}
    assert any(n.endswith("token_embedding.wrapped.weight") for n in live)
    b, _ = _backend()
    lm = b.model()
    comp = "text_encoder_2" if family == "sdxl" else "text_encoder"
    emb = lambda te: te.get_input_embeddings().weight  # noqa: E731
    assert torch.equal(emb(lm.text_encoders[comp]), emb(m.text_encoders[comp]))


@pytest.mark.parametrize("family", ["sd1", "sd2", "sdxl"])
def test_apply_and_undo_reach_the_next_image_despite_the_cond_cache(webui, family):
    """A1111 keeps the last prompt's conds (persistent cond cache, also the hires pair) keyed on
    the prompt, not the weights: right after Apply the same prompt must be encoded by the edited
    text encoder, and right after Undo by the original one, bit for bit."""
    import fake_sd
    from modules import processing

    m, sm, ck = _load(webui, family)
    b, wb = _backend()
    prompt, neg = "a cat", "blurry"
    c0, uc0, hc0, huc0 = processing.txt2img(prompt, neg, enable_hr=True)
    again = processing.txt2img(prompt, neg, enable_hr=True)
    assert again[0] is c0 and again[1] is uc0 and again[2] is hc0  # the caches answer

    edit = wb.compute_erase("cat", "dog", "", "erasepro", ERASE_ADV)
    assert any(k.startswith("text_encoder") for k in edit.deltas)
    wb.apply(edit)
    c1, uc1, hc1, huc1 = processing.txt2img(prompt, neg, enable_hr=True)
    fresh = fake_sd.encode(sm, [prompt])  # the live weights, no cache
    assert torch.equal(c1, fresh) and torch.equal(hc1, fresh)
    assert torch.equal(uc1, fake_sd.encode(sm, [neg])) and torch.equal(huc1, uc1)
    assert not torch.allclose(c1, c0, atol=1e-4)  # the edit is in the very next image

    wb.undo()
    c2, uc2, hc2, huc2 = processing.txt2img(prompt, neg, enable_hr=True)
    assert torch.equal(c2, c0) and torch.equal(uc2, uc0) and torch.equal(hc2, c0) and torch.equal(huc2, uc0)
    assert c2 is not c0  # recomputed after Undo, not the stale entry


def test_clear_cond_cache_empties_shared_lists_in_place(webui):
    """Processing objects hold the class-level lists themselves, so they are emptied in place."""
    from modules import processing

    from weightsmith.a1111_extension.a1111 import clear_cond_cache

    _load(webui, "sd1")
    processing.txt2img("x", "y", enable_hr=True)
    p = processing.StableDiffusionProcessingTxt2Img("x", "y")
    held = [p.cached_c, p.cached_uc, p.cached_hr_c, p.cached_hr_uc]
    assert held[0][0] is not None and held[1][0] is not None
    assert clear_cond_cache() >= 2
    assert all(c == [None, None] for c in held)
    assert clear_cond_cache() == 0
