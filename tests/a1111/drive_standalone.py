"""End-to-end drive of the Weightsmith tab served standalone under gradio 3.41.2 (A1111's pin).

Run with the gradio-3 venv's python (tests/a1111/setup_env.sh); tests/test_a1111_tab_gradio.py
does that and checks the results. Usage: drive_standalone.py WORKDIR PORT. Prints one JSON line.

Drives the real HTTP API with gradio_client (the same queue/progress path as the browser):
Apply -> weights changed by exactly ΔW; Undo -> bit-exact originals; Save as LoRA -> a file;
a wrong input -> a clear message, not a traceback.
"""

import json
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from helpers import default_or_tiny_model, import_weightsmith  # noqa: E402


def main(work: Path, port: int) -> dict:
    import_weightsmith()
    import gradio
    from gradio_client import Client

    from weightsmith.a1111_extension.standalone import make_app

    model_dir = default_or_tiny_model(work)
    loras, ckpts = work / "loras", work / "checkpoints"
    demo, backend = make_app(model_dir, loras, ckpts)
    wb = demo.weightsmith_workbench
    model = backend.model()
    names = [n + "." + s for n in model.unet_cross_attention_names() for s in ("to_k", "to_v")]
    names += [
        f"text_encoder.text_model.encoder.layers.{i}.self_attn.{p}"
        for i in range(model.text_encoders["text_encoder"].config.num_hidden_layers)
        for p in ("k_proj", "v_proj")
    ]
    before = {n: model.weight(n).clone() for n in names}
    demo.queue()
    demo.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True)
    res = {"gradio": gradio.__version__, "model": str(model_dir), "family": model.family}
    try:
        c = Client(f"http://127.0.0.1:{port}/", verbose=False)
        common = ["cat", "dog", "", "erasepro", "suffix", ["k_proj", "v_proj"], "", "off", 0.5, 1.0, 1e-4, 0]
        out = c.predict(*common, 1.0, api_name="/weightsmith_apply")
        res["apply_status"] = out[0]
        res["apply_state"] = out[3]
        edit = wb.applied
        assert edit is not None, out
        res["edited"] = sorted(edit.deltas)
        err = 0.0
        for n in names:
            want = before[n] + edit.deltas[n] if n in edit.deltas else before[n]
            err = max(err, float((model.weight(n) - want).abs().max()))
        res["apply_max_err"] = err
        res["changed"] = sum(not torch.equal(model.weight(n), before[n]) for n in names)
        out = c.predict(api_name="/weightsmith_undo")
        res["undo_status"] = out[0]
        res["undo_bit_exact"] = all(torch.equal(model.weight(n), before[n]) for n in names)
        out = c.predict(*common, "erase-cat", 0, "lora", api_name="/weightsmith_save_lora")
        res["save_status"] = out[0]
        res["lora_files"] = sorted(str(p) for p in loras.glob("*.safetensors"))
        res["weights_untouched_by_save"] = all(torch.equal(model.weight(n), before[n]) for n in names)
        out = c.predict(
            "",
            "dog",
            "",
            "erasepro",
            "suffix",
            ["k_proj", "v_proj"],
            "",
            "off",
            0.5,
            1.0,
            1e-4,
            0,
            1.0,
            api_name="/weightsmith_apply",
        )
        res["empty_target_status"] = out[0]
        out = c.predict(
            ["nope.safetensors"],
            "",
            "",
            "iteris",
            1,
            1,
            1,
            0,
            "",
            0,
            False,
            0,
            "mean",
            "",
            api_name="/weightsmith_merge",
        )
        res["bad_lora_status"] = out[0]
        html = __import__("urllib.request").request.urlopen(f"http://127.0.0.1:{port}/").read().decode()
        res["page_ok"] = "gradio" in html.lower()
    finally:
        demo.close()
    return res


if __name__ == "__main__":
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(1)
    r = main(Path(sys.argv[1]), int(sys.argv[2]))
    print("RESULT " + json.dumps(r))
