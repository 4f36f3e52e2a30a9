"""The node pack on Flux.1 inside a real ComfyUI (0.3.75) server, driven over HTTP (docs/flux.md, "Hosts").

The model is what ComfyUI's own loaders take: a full-width random Flux.1-dev transformer at 1 double + 1
single block (ComfyUI counts the blocks from the keys) in ``models/unet``, and the text encoders ComfyUI
requires for Flux — a full-size random CLIP-L and a full-size random T5-XXL stored in fp8 (e4m3fn, as
``t5xxl_fp8_e4m3fn.safetensors`` files are; ComfyUI's T5-XXL is fixed at 24 blocks of 4096) — in
``models/clip`` (written once into the test cache by ``core/lab/flux_bench.py``). The server runs
without ``--fp32-text-enc``, so it holds T5 as stored (4.8 GB) rather than in float32 (19 GB).

Graphs: UNETLoader + DualCLIPLoader (type flux) → Erase Concepts (uce) → KSampler → SaveLatent; the
base branch sampled before and after the erase and after a fresh load is bit-identical; the saved LoRA
through ComfyUI's LoraLoaderModelOnly loads with 0 keys not loaded and gives the in-graph latent; the
same for an IterIS merge of two LoRAs. Latents (SaveLatent) stand for images: the VAE is not part of
what Weightsmith edits.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent / "comfy"))
import harness as H  # noqa: E402

pytestmark = [pytest.mark.host, pytest.mark.slow]

PROMPT = "a cafe at night by Van Gogh"
T5_NAME = "t5xxl_fp8_e4m3fn.safetensors"
FLAGS = ["--cpu", "--force-fp32", "--disable-auto-launch"]


@pytest.fixture(scope="module")
def files():
    from weightsmith.core.lab.flux_bench import write_full_random_flux

    if H.skip_requested():
        pytest.skip("WEIGHTSMITH_SKIP_COMFY is set (developer escape hatch; CI runs these tests)")
    tr, tes = write_full_random_flux(H.CACHE / "models" / "flux-1x1", 0, True, torch.float8_e4m3fn)
    return {"transformer": tr, "clip": tes[0], "t5": tes[1]}


@pytest.fixture(scope="module")
def server(files):
    try:
        H.run_setup(checkpoint=False)
        s = H.ComfyServer(models={"unet": [files["transformer"]], "clip": [files["clip"], files["t5"]]}, flags=FLAGS)
        s.start()
    except H.SetupError as e:  # a broken set-up is a failure, never a silent skip
        pytest.fail(f"the real-ComfyUI test environment could not be set up: {e}")
    yield s
    s.cleanup()


def _loaders(g):
    un = g.add("UNETLoader", unet_name="flux1-dev.safetensors", weight_dtype="default")
    dc = g.add("DualCLIPLoader", clip_name1="clip_l.safetensors", clip_name2=T5_NAME, type="flux")
    pos = g.add("CLIPTextEncode", clip=[dc, 0], text=PROMPT)
    fg = g.add("FluxGuidance", conditioning=[pos, 0], guidance=3.5)
    return un, dc, fg


def _sample(g, model, cond, prefix):
    lat = g.add("EmptySD3LatentImage", width=64, height=64, batch_size=1)
    ks = g.add("KSampler", model=model, positive=[cond, 0], negative=[cond, 0], latent_image=[lat, 0], seed=7,
               steps=2, cfg=1.0, sampler_name="euler", scheduler="simple", denoise=1.0)  # fmt: skip
    return g.add("SaveLatent", samples=[ks, 0], filename_prefix=prefix)


def _latent(server, h, nid):
    from safetensors.torch import load_file

    return load_file(str(H.latents_of(h, server)[nid]))["latent_tensor"].float()


def _rel(a, b):
    return float((a - b).norm() / b.norm().clamp_min(1e-12))


def _saved_name(h, save_id):
    text = h["outputs"][save_id]["weightsmith_report"][0]
    return re.search(r"load it with Load LoRA as '([^']+)'", text).group(1)


def _not_loaded(server, since: int) -> list:
    return re.findall(r"lora key not loaded: (\S+)", server.log()[since:])


def test_erase_on_flux_in_a_real_comfyui(server):
    """Erase in-graph changes the sample; the base branch is bit-identical before, after and on a fresh load;
    the saved LoRA loads with 0 keys not loaded and gives the in-graph sample."""
    g = H.Graph()
    un, dc, fg = _loaders(g)
    base_first = _sample(g, [un, 0], fg, "ws_flux/base_first")
    er = g.add("WeightsmithEraseConcepts", model=[un, 0], clip=[dc, 0], targets="Van Gogh", anchors="art",
               method="uce", strength=1.0, prompt_expansion="off")  # fmt: skip
    edited = _sample(g, [er, 0], fg, "ws_flux/edited")  # uce on Flux changes no text encoder: the same text
    sv = g.add("WeightsmithSaveEditAsLora", edit=[er, 2], filename_prefix="ws_flux/erase", rank=0)
    h = server.run(g.nodes, timeout=1200)
    lat_base, lat_edit = _latent(server, h, base_first), _latent(server, h, edited)
    assert _rel(lat_edit, lat_base) > 1e-3, "the erasure did not change the sample"
    assert "txt_in" in h["outputs"][er]["weightsmith_report"][0]  # the report names the stage it edited

    # the base branch again, same loaders (cached: the very objects the Erase node was given), new sampler
    g2 = H.Graph()
    un2, dc2, fg2 = _loaders(g2)
    lo_mark = len(server.log())
    name = _saved_name(h, sv)
    again = _sample(g2, [un2, 0], fg2, "ws_flux/base_again")
    lo = g2.add("LoraLoaderModelOnly", model=[un2, 0], lora_name=name, strength_model=1.0)
    from_lora = _sample(g2, [lo, 0], fg2, "ws_flux/from_lora")
    h2 = server.run(g2.nodes, timeout=1200)
    assert torch.equal(_latent(server, h2, again), lat_base), "the base model changed after the erase"
    assert _not_loaded(server, lo_mark) == []
    assert _rel(_latent(server, h2, from_lora), lat_edit) <= 1e-3, "the saved LoRA does not give the in-graph edit"

    # and on a fresh load (models unloaded)
    server.free()
    g3 = H.Graph()
    un3, _, fg3 = _loaders(g3)
    fresh = _sample(g3, [un3, 0], fg3, "ws_flux/base_fresh")
    h3 = server.run(g3.nodes, timeout=1200)
    assert torch.equal(_latent(server, h3, fresh), lat_base)


def test_iteris_merge_on_flux_in_a_real_comfyui(server, files):
    """IterIS Merge of two Flux LoRAs in-graph; the saved merge through LoraLoaderModelOnly: 0 keys not
    loaded, the in-graph merge's sample."""
    from safetensors.torch import save_file

    from weightsmith.core.flux_io import load_flux

    model = load_flux(files["transformer"])
    mods = ["transformer_blocks.0.attn.to_q", "transformer_blocks.0.ff.net.2", "single_transformer_blocks.0.proj_mlp"]
    for i in range(2):
        g = torch.Generator().manual_seed(40 + i)
        sd = {}
        for m in mods[i:] + ["context_embedder"]:
            out, inn = model.weight_shape(f"transformer.{m}")
            sd[f"transformer.{m}.lora_A.weight"] = torch.randn(4, inn, generator=g) * inn**-0.5
            sd[f"transformer.{m}.lora_B.weight"] = torch.randn(out, 4, generator=g) * 0.02
        save_file(sd, str(server.base / "models" / "loras" / f"ws_flux_lora_{i}.safetensors"))
    g = H.Graph()
    un, dc, fg = _loaders(g)
    st = None
    for i, prompt in enumerate(("a cafe at night", "a river landscape, oil on canvas")):
        args = dict(lora_name=f"ws_flux_lora_{i}.safetensors", weight=1.0, sample_prompts=prompt)
        if st is not None:
            args["stack"] = [st, 0]
        st = g.add("WeightsmithLoraStack", **args)
    mg = g.add("WeightsmithIterISMerge", model=[un, 0], clip=[dc, 0], stack=[st, 0], method="iteris", iterations=1,
               samples=1, steps=1, resolution=64, seed=0)  # fmt: skip
    merged = _sample(g, [mg, 0], fg, "ws_flux/merged")
    sv = g.add("WeightsmithSaveEditAsLora", edit=[mg, 2], filename_prefix="ws_flux/merge", rank=0)
    h = server.run(g.nodes, timeout=1800)
    assert "iteris" in h["outputs"][mg]["weightsmith_report"][0]
    lat_merged = _latent(server, h, merged)

    g2 = H.Graph()
    un2, _, fg2 = _loaders(g2)
    mark = len(server.log())
    lo = g2.add("LoraLoaderModelOnly", model=[un2, 0], lora_name=_saved_name(h, sv), strength_model=1.0)
    from_lora = _sample(g2, [lo, 0], fg2, "ws_flux/merge_from_lora")
    h2 = server.run(g2.nodes, timeout=1200)
    assert _not_loaded(server, mark) == []
    assert _rel(_latent(server, h2, from_lora), lat_merged) <= 1e-3
