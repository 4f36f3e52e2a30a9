"""The tab as A1111 v1.10 loads it, under gradio 3.41.2, on the modules.* stand-in.

Usage: drive_a1111_tab.py WORKDIR PORT [forge]. Prints one JSON line ("RESULT {...}").
Imports scripts/weightsmith_tab.py by file (as A1111 does), collects its on_ui_tabs tab, renders
it inside an outer Blocks/Tab like A1111's UI, serves it and drives Apply/Undo/Save as LoRA over
HTTP with gradio_client. With "forge", a ``modules_forge`` package exists and the tab must be
save-only and say why.
"""
import importlib.util
import json
import os
import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]


def main(work: Path, port: int, forge: bool) -> dict:
    os.environ["WS_FAKE_WEBUI_ROOT"] = str(work)
    sys.path.insert(0, str(HERE / "fake_webui"))
    if forge:
        (work / "forge_pkg" / "modules_forge").mkdir(parents=True, exist_ok=True)
        (work / "forge_pkg" / "modules_forge" / "__init__.py").write_text("")
        sys.path.insert(0, str(work / "forge_pkg"))
    import fake_sd
    import gradio as gr
    from gradio_client import Client
    from modules import script_callbacks, sd_models, shared

    # A1111 imports the extension's scripts by file, module name = file name
    path = REPO / "scripts" / "weightsmith_tab.py"
    spec = importlib.util.spec_from_file_location("weightsmith_tab.py", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)

    from weightsmith.core.model_io import save_single_file, to_ldm_state_dict
    from weightsmith.core.random_models import build_random_model

    m = build_random_model("sd1", "tiny", seed=5)
    ck = Path(sd_models.model_path) / "base.safetensors"
    save_single_file(m, ck)
    os.environ["WEIGHTSMITH_TOKENIZER"] = str(m.tokenizers["text_encoder"].name_or_path)
    enc = dict(m.text_encoders, tokenizer=m.tokenizers["text_encoder"])
    shared.sd_model = fake_sd.build_sd_model("sd1", to_ldm_state_dict(m), enc, {}, ck)

    tabs = script_callbacks.ui_tabs_callback()
    res = {"gradio": gr.__version__, "tabs": [(t[1], t[2]) for t in tabs]}
    blocks = tabs[0][0]
    with gr.Blocks(analytics_enabled=False) as demo:       # A1111 renders each tab like this
        with gr.Tabs():
            with gr.Tab(tabs[0][1], id=tabs[0][2]):
                blocks.render()
    wb = blocks.weightsmith_workbench
    res["backend"] = type(wb.backend).__name__
    live = shared.sd_model.model.diffusion_model
    before = {k: v.clone() for k, v in live.state_dict().items()}
    te_before = {k: v.clone() for k, v in shared.sd_model.cond_stage_model.state_dict().items()}
    demo.queue()
    demo.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True)
    try:
        c = Client(f"http://127.0.0.1:{port}/", verbose=False)
        common = ["cat", "dog", "", "uce", "suffix", ["k_proj", "v_proj"], "", "off", 0.5, 1.0, 1e-4]
        out = c.predict(*common, 1.0, api_name="/apply")
        res["apply_status"], res["model_info"] = out[0], out[4]
        after = live.state_dict()
        res["changed"] = sorted(k for k in before if not torch.equal(before[k], after[k]))
        if wb.applied is not None:
            n = next(iter(wb.applied.deltas))
            s = wb.backend.slots([n])[n]
            res["apply_exact"] = bool(torch.allclose(getattr(s.module, s.param), m.weight(n) + wb.applied.deltas[n],
                                                     atol=1e-6))
        out = c.predict(api_name="/undo")
        res["undo_status"] = out[0]
        after = live.state_dict()
        res["undo_bit_exact"] = all(torch.equal(before[k], after[k]) for k in before) and all(
            torch.equal(te_before[k], v) for k, v in shared.sd_model.cond_stage_model.state_dict().items())
        out = c.predict(*common, "tab-lora", 0, "lora", api_name="/save_lora")
        res["save_status"] = out[0]
        res["lora_files"] = sorted(p.name for p in Path(shared.cmd_opts.lora_dir).glob("*.safetensors"))
        res["state_after"] = {"job": shared.state.job, "job_count": shared.state.job_count}
    finally:
        demo.close()
    return res


if __name__ == "__main__":
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(1)
    r = main(Path(sys.argv[1]), int(sys.argv[2]), len(sys.argv) > 3 and sys.argv[3] == "forge")
    print("RESULT " + json.dumps(r))
