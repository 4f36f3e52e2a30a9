"""The tab as A1111 v1.10 loads it, under gradio 3.41.2, on the modules.* stand-in.

Usage: drive_a1111_tab.py WORKDIR PORT [forge]. Prints one JSON line ("RESULT {...}").
Imports scripts/weightsmith_tab.py by file (as A1111 does), collects its on_ui_tabs tab, renders
it inside an outer Blocks/Tab like A1111's UI, serves it and drives Apply/Undo/Save as LoRA over
HTTP with gradio_client. With "forge", the same on the Forge stand-in (tests/a1111/fake_forge):
the tab picks its Forge backend, Apply reaches the weights Forge samples with, Undo restores them.
"""

import importlib.util
import json
import os
import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]


COMMON = ["cat", "dog", "", "uce", "suffix", ["k_proj", "v_proj"], "", "off", 0.5, 1.0, 1e-4, 0]


def _tab(demo_port):
    """Import the entry script by file (as A1111/Forge do), render its tab inside an outer Blocks/Tab
    like the web UI, serve it; returns (result dict, workbench, demo, client)."""
    import gradio as gr
    from gradio_client import Client
    from modules import script_callbacks

    path = REPO / "scripts" / "weightsmith_tab.py"
    spec = importlib.util.spec_from_file_location("weightsmith_tab.py", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    tabs = script_callbacks.ui_tabs_callback()
    res = {"gradio": gr.__version__, "tabs": [(t[1], t[2]) for t in tabs]}
    blocks = tabs[0][0]
    with gr.Blocks(analytics_enabled=False) as demo:
        with gr.Tabs():
            with gr.Tab(tabs[0][1], id=tabs[0][2]):
                blocks.render()
    wb = blocks.weightsmith_workbench
    res["backend"] = type(wb.backend).__name__
    demo.queue()
    demo.launch(server_name="127.0.0.1", server_port=demo_port, prevent_thread_lock=True, quiet=True)
    return res, wb, demo, Client(f"http://127.0.0.1:{demo_port}/", verbose=False)


def _checkpoint():
    """A tiny random SD1 model saved as the web UI's selected checkpoint (its tokenizer for the tab)."""
    from modules import sd_models

    from weightsmith.core.lab.random_models import build_random_model
    from weightsmith.core.model_io import save_single_file

    m = build_random_model("sd1", "tiny", seed=5)
    ck = Path(sd_models.model_path) / "base.safetensors"
    save_single_file(m, ck)
    os.environ["WEIGHTSMITH_TOKENIZER"] = str(m.tokenizers["text_encoder"].name_or_path)
    return m, ck


def _save_lora(c, res):
    """Save as LoRA over HTTP, then the files and the host's job state."""
    from modules import shared

    out = c.predict(*COMMON, "tab-lora", 0, "lora", api_name="/weightsmith_save_lora")
    res["save_status"] = out[0]
    res["lora_files"] = sorted(p.name for p in Path(shared.cmd_opts.lora_dir).glob("*.safetensors"))
    res["state_after"] = {"job": shared.state.job, "job_count": shared.state.job_count}


def main_forge(work: Path, port: int) -> dict:
    os.environ["WS_FAKE_WEBUI_ROOT"] = str(work)
    sys.path[:0] = [str(HERE / "fake_forge"), str(HERE / "fake_webui")]
    import forge_engine
    from modules import processing, sd_models, shared

    from weightsmith.core.naming import UNetLayout, comfy_key

    forge_engine.install()
    m, ck = _checkpoint()
    forge_engine.TOKENIZER = m.tokenizers["text_encoder"]
    sd_models.select(ck)
    shared.sd_model = sd_models.FakeInitialModel()  # Forge loads at the first generation
    res, wb, demo, c = _tab(port)
    try:
        _, _, before = processing.txt2img("a photo of a cat")
        out = c.predict(*COMMON, 1.0, api_name="/weightsmith_apply")
        res["apply_status"], res["model_info"] = out[0], out[4]
        _, _, after = processing.txt2img("a photo of a cat")
        res["changed"] = sorted(k for k in before if not torch.equal(before[k], after[k]))
        if wb.applied is not None:
            layout = UNetLayout.from_config(m.unet_config)
            res["apply_exact"] = all(
                torch.allclose(
                    after[comfy_key(n + ".weight", "sd1", layout)],
                    before[comfy_key(n + ".weight", "sd1", layout)] + d,
                    atol=1e-6,
                )
                for n, d in wb.applied.deltas.items()
            )
        out = c.predict(api_name="/weightsmith_undo")
        res["undo_status"] = out[0]
        _, _, again = processing.txt2img("a photo of a cat")
        res["undo_bit_exact"] = all(torch.equal(before[k], again[k]) for k in before)
        _save_lora(c, res)
    finally:
        demo.close()
    return res


def main(work: Path, port: int) -> dict:
    os.environ["WS_FAKE_WEBUI_ROOT"] = str(work)
    sys.path.insert(0, str(HERE / "fake_webui"))
    import fake_sd
    from modules import shared

    from weightsmith.core.model_io import to_ldm_state_dict

    m, ck = _checkpoint()
    enc = dict(m.text_encoders, tokenizer=m.tokenizers["text_encoder"])
    shared.sd_model = fake_sd.build_sd_model("sd1", to_ldm_state_dict(m), enc, {}, ck)
    res, wb, demo, c = _tab(port)
    live = shared.sd_model.model.diffusion_model
    before = {k: v.clone() for k, v in live.state_dict().items()}
    te_before = {k: v.clone() for k, v in shared.sd_model.cond_stage_model.state_dict().items()}
    try:
        out = c.predict(*COMMON, 1.0, api_name="/weightsmith_apply")
        res["apply_status"], res["model_info"] = out[0], out[4]
        after = live.state_dict()
        res["changed"] = sorted(k for k in before if not torch.equal(before[k], after[k]))
        if wb.applied is not None:
            n = next(iter(wb.applied.deltas))
            s = wb.backend.slots([n])[n]
            res["apply_exact"] = bool(
                torch.allclose(getattr(s.module, s.param), m.weight(n) + wb.applied.deltas[n], atol=1e-6)
            )
        out = c.predict(api_name="/weightsmith_undo")
        res["undo_status"] = out[0]
        after = live.state_dict()
        res["undo_bit_exact"] = all(torch.equal(before[k], after[k]) for k in before) and all(
            torch.equal(te_before[k], v) for k, v in shared.sd_model.cond_stage_model.state_dict().items()
        )
        _save_lora(c, res)
    finally:
        demo.close()
    return res


if __name__ == "__main__":
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(1)
    forge = len(sys.argv) > 3 and sys.argv[3] == "forge"
    r = (main_forge if forge else main)(Path(sys.argv[1]), int(sys.argv[2]))
    print("RESULT " + json.dumps(r))
