"""The node pack inside a real ComfyUI (0.3.75) server, driven over HTTP.

Set-up and server: tests/comfy/harness.py (cached venv, random SD1.5-family checkpoint).
Every check compares what ComfyUI computed with an independent computation in this process:
core's own erasure on the same checkpoint, the unedited checkpoint, or the LoRA files' tensors.
"""

from __future__ import annotations

import re
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent / "comfy"))
import harness as H  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
import ws_timeouts as T  # noqa: E402

NODE_IDS = {"WeightsmithEraseConcepts", "WeightsmithLoraStack", "WeightsmithIterISMerge", "WeightsmithSaveEditAsLora"}
TARGET, ANCHOR = "Van Gogh", "art"
PROMPT = "a painting by Van Gogh"
ERASE_ARGS = dict(
    targets=TARGET,
    anchors=ANCHOR,
    method="erasepro",
    strength=1.0,
    preserve="",
    layers="",
    token_mode="suffix",
    lam=0.5,
    prompt_expansion="off",
    clip_skip=0,
)


pytestmark = pytest.mark.host  # runs in a real host's environment (tests/run.sh: the "host" tier)


@pytest.fixture(scope="module")
def server():
    if H.skip_requested():
        pytest.skip("WEIGHTSMITH_SKIP_COMFY is set (developer escape hatch; CI runs these tests)")
    try:
        H.run_setup()
        s = H.ComfyServer().start()
    except H.SetupError as e:  # a broken set-up is a failure, never a silent skip
        pytest.fail(f"the real-ComfyUI test environment could not be set up: {e}")
    yield s
    s.cleanup()


@pytest.fixture(scope="module")
def core_model():
    from weightsmith.core.model_io import load_model

    return load_model(H.CKPT, tokenizer=H.COMFY / "comfy" / "sd1_tokenizer")


def load_probe(server, name):
    from safetensors.torch import load_file

    return load_file(str(server.output("probes", name + ".safetensors")))


def core_kv(model, prompt):
    """What the UNet's cross-attentions compute for ``prompt``: K, V per attn2 (LDM names)."""
    ctx = model.encode([prompt]).context
    layout = model.layout
    out = {}
    for name in model.unet_cross_attention_names():
        ldm = layout.to_ldm(name[len("unet.") :])
        out[ldm + ".k"] = ctx[0] @ model.weight(name + ".to_k").float().T
        out[ldm + ".v"] = ctx[0] @ model.weight(name + ".to_v").float().T
    return ctx, out


def rel_err(a, b):
    return float((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-12))


def img(path):
    from PIL import Image

    return np.asarray(Image.open(path).convert("RGB"), dtype=np.int16)


# ----------------------------------------------------------------------------------------------
def test_object_info_lists_every_node_with_tooltips(server):
    info = server.get("/object_info")
    assert NODE_IDS <= set(info), f"missing nodes: {NODE_IDS - set(info)}"
    for nid in NODE_IDS:
        d = info[nid]
        assert d["category"] == "Weightsmith"
        assert d["display_name"].endswith("(Weightsmith)")
        inputs = {**d["input"]["required"], **d["input"].get("optional", {})}
        assert inputs, nid
        for name, spec in inputs.items():
            assert isinstance(spec, list) and len(spec) == 2 and spec[1].get("tooltip"), f"{nid}.{name} has no tooltip"
    erase = info["WeightsmithEraseConcepts"]
    assert erase["input"]["required"]["method"][0] == ["erasepro", "zero-residual", "uce"]
    assert erase["output"] == ["MODEL", "CLIP", "WEIGHTSMITH_EDIT", "STRING", "IMAGE"]
    assert info["WeightsmithSaveEditAsLora"]["output_node"] is True
    # example workflows are offered in the template browser, the web extension is served
    templates = server.get("/api/workflow_templates")
    shipped = sorted(p.stem for p in (H.REPO / "example_workflows").glob("*.json"))
    assert sorted(templates.get("weightsmith", [])) == shipped and shipped
    import urllib.request

    with urllib.request.urlopen(server.url + "/extensions/weightsmith/weightsmith.js", timeout=30) as r:
        assert b"weightsmith_report" in r.read()
    log = server.log()
    assert "IMPORT FAILED" not in "\n".join(ln for ln in log.splitlines() if "weightsmith" in ln.lower())
    m = re.search(r"([\d.]+) seconds: \S*custom_nodes/weightsmith\b", log)
    assert m, "the pack is not in ComfyUI's custom-node import list"
    assert float(m.group(1)) < 2.0, "the pack imports slowly: heavy imports must be lazy"


def test_user_errors_reach_the_ui_as_messages(server):
    """A bad input stops the graph with Weightsmith's message (what to fix), not a deep traceback."""
    g = H.Graph()
    ck = g.add("CheckpointLoaderSimple", ckpt_name=H.CKPT_NAME)
    er = g.add("WeightsmithEraseConcepts", model=[ck, 0], clip=[ck, 1], **{**ERASE_ARGS, "targets": "  \n "})
    g.add("WeightsmithSaveEditAsLora", edit=[er, 2], filename_prefix="ws_test/never", rank=0)
    h = server.wait(server.queue(g.nodes), timeout=300)
    assert h["status"]["status_str"] == "error"
    err = next(m[1] for m in h["status"]["messages"] if m[0] == "execution_error")
    assert err["exception_type"].endswith("WeightsmithError"), err["exception_type"]
    assert err["exception_message"].startswith("targets is empty: write at least one concept")
    assert not server.output("loras", "ws_test").exists() or not list(server.output("loras", "ws_test").glob("never*"))


@pytest.fixture(scope="module")
def erase_run(server):
    """One graph: base branch and erased branch from one checkpoint loader, probes on both,
    the edit saved as a LoRA."""
    g = H.Graph()
    ck = g.add("CheckpointLoaderSimple", ckpt_name=H.CKPT_NAME)
    er = g.add("WeightsmithEraseConcepts", model=[ck, 0], clip=[ck, 1], **ERASE_ARGS)
    H.txt2img(g, [ck, 0], [ck, 1], [ck, 2], PROMPT, "nm_base")
    pos_e = H.txt2img(g, [er, 0], [er, 1], [ck, 2], PROMPT, "edited")
    pos_b = g.add("CLIPTextEncode", clip=[ck, 1], text=PROMPT)
    g.add("WeightsmithTestProbe", model=[ck, 0], conditioning=[pos_b, 0], name="base")
    g.add("WeightsmithTestProbe", model=[er, 0], conditioning=[pos_e, 0], name="edited")
    sv = g.add("WeightsmithSaveEditAsLora", edit=[er, 2], filename_prefix="ws_test/erase", rank=0)
    t0 = time.time()
    h = server.run(g.nodes)
    print(f"[erase graph: {time.time() - t0:.0f}s]", file=sys.stderr)
    return {"history": h, "erase_id": er, "save_id": sv, "images": H.images_of(h, server)}


def test_erase_node_applies_cores_edit(server, erase_run, core_model):
    from weightsmith.core.erase import EraseOptions, erase

    probe_e = load_probe(server, "edited")
    probe_b = load_probe(server, "base")
    # independent: core's erasure on the same checkpoint file, applied to a copy
    edit = erase(
        core_model,
        [TARGET],
        [ANCHOR],
        method="erasepro",
        options=EraseOptions(tokens="suffix", lam=0.5, expand_prompts=False),
    )
    edited = edit.apply(core_model)
    ctx_e, kv_e = core_kv(edited, PROMPT)
    ctx_b, kv_b = core_kv(core_model, PROMPT)
    assert rel_err(probe_b["context"][0], ctx_b[0]) < 1e-4  # adapter-free baseline agrees
    assert rel_err(probe_e["context"][0], ctx_e[0]) < 2e-3  # CLIP patches applied
    assert set(kv_e) == {
        k[len("diffusion_model.") :] if k.startswith("diffusion_model.") else k
        for k in probe_e
        if k not in ("context", "pooled")
    }
    for k, v in kv_e.items():
        assert rel_err(probe_e[k][0], v) < 2e-3, k
        assert rel_err(probe_b[k][0], kv_b[k]) < 1e-4, k
    # and the edit is not a no-op: the target's keys moved
    moved = [rel_err(probe_e[k][0], probe_b[k][0]) for k in kv_e]
    assert min(moved) > 1e-2
    ui = erase_run["history"]["outputs"][erase_run["erase_id"]]["weightsmith_report"][0]
    assert "erasepro" in ui and f"modules edited: {len(edit.deltas)}" in ui


def test_unedited_branch_is_unchanged(server, erase_run):
    server.free()  # drop ComfyUI's cache so the base graph really runs again
    g = H.Graph()
    ck = g.add("CheckpointLoaderSimple", ckpt_name=H.CKPT_NAME)
    H.txt2img(g, [ck, 0], [ck, 1], [ck, 2], PROMPT, "nm_ref")
    h = server.run(g.nodes)
    ref = img(next(iter(H.images_of(h, server).values())))
    paths = erase_run["images"]
    base = [img(p) for p in paths.values() if "nm_base" in p.name]
    edited = [img(p) for p in paths.values() if "edited" in p.name]
    assert len(base) == 1 and len(edited) == 1
    assert np.array_equal(base[0], ref), "the Erase node changed the unedited branch"
    assert not np.array_equal(edited[0], ref), "the erased branch rendered the same image"


def test_saved_lora_reproduces_the_edit_in_core_loraloader(server, erase_run):
    from safetensors import safe_open

    out = erase_run["history"]["outputs"][erase_run["save_id"]]
    text = out["weightsmith_report"][0]
    lora_name = re.search(r"load it with Load LoRA as '([^']+)'", text).group(1)
    path = server.output("loras", lora_name)
    assert path.exists()
    with safe_open(str(path), "pt") as f:
        keys = list(f.keys())
        meta = f.metadata()
    assert any(k.startswith("lora_unet_") and k.endswith(".lora_up.weight") for k in keys)
    assert any(k.startswith("lora_te_text_model_encoder_layers_") for k in keys)
    assert all(k.rsplit(".", 2)[0] + ".alpha" in keys for k in keys if k.endswith("lora_down.weight"))
    assert meta["ss_base_model_version"] == "sd_v1"
    server.free()
    g = H.Graph()
    ck = g.add("CheckpointLoaderSimple", ckpt_name=H.CKPT_NAME)
    lo = g.add("LoraLoader", model=[ck, 0], clip=[ck, 1], lora_name=lora_name, strength_model=1.0, strength_clip=1.0)
    pos = H.txt2img(g, [lo, 0], [lo, 1], [ck, 2], PROMPT, "from_lora")
    g.add("WeightsmithTestProbe", model=[lo, 0], conditioning=[pos, 0], name="from_lora")
    h = server.run(g.nodes)
    a, b = load_probe(server, "from_lora"), load_probe(server, "edited")
    assert set(a) == set(b)
    for k in a:
        assert rel_err(a[k], b[k]) < 1e-4, k
    im_lora = img(next(iter(H.images_of(h, server).values())))
    im_edit = img(next(p for p in erase_run["images"].values() if "edited" in p.name))
    assert np.abs(im_lora - im_edit).max() <= 2


# ----------------------------------------------------------------------------------------------
def _write_test_loras(server, core_model):
    """Two small kohya LoRAs for the checkpoint (attn2 to_k/to_v and one CLIP layer)."""
    from weightsmith.core.edit import Edit
    from weightsmith.core.lora_write import save_lora

    names = [n + s for n in core_model.unet_cross_attention_names() for s in (".to_k", ".to_v")]
    names += ["text_encoder.text_model.encoder.layers.3.self_attn.k_proj"]
    out = []
    for i in range(2):
        g = torch.Generator().manual_seed(100 + i)
        deltas, factors = {}, {}
        for n in names:
            w = core_model.weight(n)
            up = torch.randn(w.shape[0], 4, generator=g) * 0.05
            down = torch.randn(4, w.shape[1], generator=g) * 0.05
            deltas[n], factors[n] = up @ down, (up, down)
        path = server.base / "models" / "loras" / f"ws_test_lora_{i}.safetensors"
        save_lora(Edit("sd1", core_model.unet_config, deltas, factors, {"method": "test"}), path)
        out.append((path.name, deltas))
    return out


def _merge_graph(loras, method, prefix, **kw):
    g = H.Graph()
    ck = g.add("CheckpointLoaderSimple", ckpt_name=H.CKPT_NAME)
    st = None
    for name, w, prompt in loras:
        args = dict(lora_name=name, weight=w, sample_prompts=prompt)
        if st is not None:
            args["stack"] = [st, 0]
        st = g.add("WeightsmithLoraStack", **args)
    settings = dict(iterations=1, samples=1, steps=1, resolution=64, seed=0)
    settings.update(kw)
    mg = g.add("WeightsmithIterISMerge", model=[ck, 0], clip=[ck, 1], stack=[st, 0], method=method, **settings)
    sv = g.add("WeightsmithSaveEditAsLora", edit=[mg, 2], filename_prefix=prefix, rank=0)
    return g, mg, sv


def _merge_available():
    try:
        from weightsmith.core.lora_read import load_lora  # noqa: F401
        from weightsmith.core.merge import merge  # noqa: F401
    except ImportError:
        return False
    return True


@pytest.mark.skipif(not _merge_available(), reason="core.merge (issue 4) has not landed yet")
def test_merge_linear_equals_weighted_sum_and_interrupt_leaves_no_file(server, core_model):
    from safetensors.torch import load_file

    from weightsmith.core.lora_write import BASE_MODEL_VERSION  # noqa: F401
    from weightsmith.core.naming import kohya_prefix

    loras = _write_test_loras(server, core_model)
    spec = [(loras[0][0], 0.7, "a photo of a cat"), (loras[1][0], 0.4, "a photo of a dog")]
    g, mg, sv = _merge_graph(spec, "linear", "ws_test/merge_linear")
    h = server.run(g.nodes)
    text = h["outputs"][sv]["weightsmith_report"][0]
    name = re.search(r"load it with Load LoRA as '([^']+)'", text).group(1)
    sd = load_file(str(server.output("loras", name)))
    layout = core_model.layout
    for n in loras[0][1]:
        p = kohya_prefix(n, "sd1", layout)
        up, down = sd[p + ".lora_up.weight"], sd[p + ".lora_down.weight"]
        got = (up.flatten(1) @ down.flatten(1)) * (sd[p + ".alpha"] / down.shape[0])
        want = 0.7 * loras[0][1][n] + 0.4 * loras[1][1][n]
        assert rel_err(got, want) < 1e-4, n
    assert "linear" in h["outputs"][mg]["weightsmith_report"][0]

    # IterIS, long enough to interrupt: POST /interrupt once the merge started
    before = set(server.output("loras").rglob("*.safetensors"))
    g, mg, sv = _merge_graph(
        spec, "iteris", "ws_test/merge_interrupted", iterations=50, samples=8, steps=20, resolution=256
    )
    started = "Weightsmith: merging 2 LoRAs (iteris)"
    n0 = server.log().count(started)
    pid = server.queue(g.nodes)
    t0 = time.time()
    while server.log().count(started) == n0:  # an interrupt sent before the prompt starts is dropped
        assert time.time() - t0 < 300, "the merge never started:\n" + server.log()[-3000:]
        time.sleep(0.1)
    server.post("/interrupt")  # at once: on a fast, idle machine the whole merge can take seconds
    t1 = time.time()
    hist = server.wait(pid, timeout=180)
    assert time.time() - t1 < 120, "the merge did not stop promptly after /interrupt"
    msgs = [m[0] for m in hist["status"]["messages"]]
    assert "execution_interrupted" in msgs, f"{msgs}\n{server.log()[-2500:]}"
    after = set(server.output("loras").rglob("*.safetensors"))
    assert after == before, f"an interrupted merge left files: {after - before}"
    assert not list(server.output("loras").rglob("*.tmp")), "an interrupted merge left a temp file"


# ----------------------------------------------------------------------------------------------
def test_front_end_search_examples_and_inline_report(server):
    """Headless Chromium with ComfyUI's real front end (comfyui-frontend-package as pinned)."""
    import json

    art = H.REPO / "tests" / "artifacts"
    r = T.run(
        [str(H.VENV_PY), str(H.HERE / "browser_check.py"), server.url, str(H.REPO), str(art), "--run-report"],
        what="the ComfyUI browser check",
        env=H.venv_env(),
        capture_output=True,
        text=True,
        timeout=1200,
    )
    assert r.returncode == 0, r.stderr[-4000:]
    found = json.loads(r.stdout.strip().splitlines()[-1])
    assert NODE_IDS <= set(found["registered"])
    assert found["extension_loaded"], "web/weightsmith.js was not loaded (WEB_DIRECTORY)"
    assert "Erase Concepts (Weightsmith)" in found["search_text"], found["search_text"][:500]
    files = sorted(p.name for p in (H.REPO / "example_workflows").glob("*.json"))
    assert sorted(found["examples"]) == files and files
    used = set()
    for name, res in found["examples"].items():
        assert res["missing"] == [] and res["dialog"] == [], (name, res)
        used |= set(res["types"])
    assert NODE_IDS <= used, f"nodes without an example workflow: {NODE_IDS - used}"
    # the report arrived over the websocket and the extension put it on the node
    assert found["report_text"].startswith("Weightsmith erase (erasepro): Van Gogh")
    assert "|dW|/|W|" in found["report_text"]
    assert any(t.startswith("Weightsmith erase") for t in found["report_dom"])
    for shot in ["node_search.png", "report_on_node.png"] + [f"workflow_{Path(f).stem}.png" for f in files]:
        assert (art / shot).stat().st_size > 10_000, shot


@pytest.mark.skipif(not _merge_available(), reason="core.merge (issue 4) has not landed yet")
def test_iteris_merge_node_runs_to_a_loadable_lora(server, core_model):
    """IterIS itself through the node (tiny settings): patched clones, report, a saved LoRA that
    ComfyUI's own LoraLoader accepts with every key."""
    loras = _write_test_loras(server, core_model)
    spec = [(loras[0][0], 1.0, "a photo of a cat"), (loras[1][0], 1.0, "a photo of a dog")]
    g, mg, sv = _merge_graph(spec, "iteris", "ws_test/merge_iteris", iterations=1, samples=1, steps=1, resolution=64)
    h = server.run(g.nodes)
    rep = h["outputs"][mg]["weightsmith_report"][0]
    assert rep.startswith("Weightsmith merge (iteris): 2 LoRAs") and "|dW|/|W|" in rep
    text = h["outputs"][sv]["weightsmith_report"][0]
    name = re.search(r"load it with Load LoRA as '([^']+)'", text).group(1)
    assert server.output("loras", name).exists()
    # the merged edit touches exactly the modules the two LoRAs touch
    from safetensors import safe_open

    from weightsmith.core.naming import kohya_prefix

    with safe_open(str(server.output("loras", name)), "pt") as f:
        prefixes = {k.rsplit(".", 2)[0] for k in f.keys() if k.endswith("lora_down.weight")}
        # plus zero q/k/v/out siblings of each edited text-encoder attention weight (diffusers needs an
        # out_proj among kohya text-encoder keys, A1111 all four on fused attention; issue 12)
        edited = {kohya_prefix(n, "sd1", core_model.layout) for n in loras[0][1]}
        zero = {
            kohya_prefix(n.rsplit(".", 1)[0] + "." + sub, "sd1", core_model.layout)
            for n in loras[0][1]
            if n.startswith("text_encoder") and ".self_attn." in n
            for sub in ("q_proj", "k_proj", "v_proj", "out_proj")
        } - edited
        assert all(float(f.get_tensor(p + ".lora_up.weight").abs().max()) == 0.0 for p in zero)
    want = {kohya_prefix(n, "sd1", core_model.layout) for n in loras[0][1]}
    assert prefixes == want | zero
    # and ComfyUI's LoraLoader maps every key of it (unmapped keys are logged as "lora key not loaded")
    g2 = H.Graph()
    ck2 = g2.add("CheckpointLoaderSimple", ckpt_name=H.CKPT_NAME)
    lo2 = g2.add("LoraLoader", model=[ck2, 0], clip=[ck2, 1], lora_name=name, strength_model=1.0, strength_clip=1.0)
    pos = g2.add("CLIPTextEncode", clip=[lo2, 1], text="a photo of a cat")
    g2.add("WeightsmithTestProbe", model=[lo2, 0], conditioning=[pos, 0], name="iteris_lora")
    n_before = server.log().count("lora key not loaded")
    server.run(g2.nodes)
    assert server.log().count("lora key not loaded") == n_before
