"""Drive the Weightsmith tab inside a REAL running AUTOMATIC1111 (v1.10.1) or Forge, over HTTP only.

Usage: drive_real_a1111.py URL [LOG [HOST]] (run with the web UI's own python: it has requests,
gradio_client and numpy). URL is a web UI started with ``--api`` (docs/a1111.md says how to build
and start one); LOG, if given, is its console log (A1111 at ``--loglevel DEBUG``), where the Lora
extension names the keys of a LoRA it could not match; HOST is ``a1111`` (default) or ``forge``,
whose Lora extension words those lines differently. Prints one JSON line ("RESULT {...}").

The tab is driven through its own Gradio endpoints (``/weightsmith_apply``, ``/weightsmith_undo``,
``/weightsmith_save_lora``, ``/weightsmith_save_checkpoint``, ``/weightsmith_merge``), images come
from ``/sdapi/v1/txt2img`` (64×64, Euler, 2 steps,
fixed seed: deterministic on CPU). What is measured, all with the same prompt P unless said:

- ``base_repeat_equal``: two base images of P are identical (the host is deterministic);
- after Apply: the very next image of P (``applied``) equals the one obtained after the cond
  cache was forced to recompute (another prompt in between: ``applied_recomputed``), and differs
  from the base image;
- after Undo: the next image of P equals the base image bit for bit;
- Save as LoRA (of the applied edit) used as ``<lora:NAME:1>`` on the unedited model, Save as
  checkpoint loaded back: mean/max pixel differences to the applied image;
- Lora-extension coexistence: edit applied while another LoRA is active, the LoRA tag changed
  afterwards, Undo with the LoRA active;
- Merge (linear, and IterIS with small settings) of two tab-made LoRAs, the merged LoRA used in
  a prompt; the unmatched-key lines the Lora extension logged for each file.
"""

import base64
import io
import json
import sys
import time

import numpy as np
import requests
from gradio_client import Client
from PIL import Image

P, Q = "a photo of a cat in a garden", "a red house"
T2I = {
    "steps": 2,
    "width": 64,
    "height": 64,
    "seed": 1,
    "sampler_name": "Euler",
    "cfg_scale": 7,
    "negative_prompt": "blurry",
}
# Erase inputs in the order of the tab's `common` list:
# targets, anchors, preserve, method, tokens, te_sublayers, te_layers, expand, lam, eta_preserve, rcond,
# harden_rounds
EDIT_A = ["cat", "dog", "", "erasepro", "suffix", ["k_proj", "v_proj"], "", "off", 0.5, 1.0, 1e-4, 0]
EDIT_B = ["garden", "desert", "", "erasepro", "suffix", ["k_proj", "v_proj"], "", "off", 0.5, 1.0, 1e-4, 0]


def unmatched_lines(text: str, name: str, host: str) -> int:
    """Lines of the web UI's log saying that LoRA file ``name`` had keys no layer took."""
    f = f"/{name}.safetensors"
    if host == "forge":  # "[LORA] Loading F for M with unmatched keys [...]", "... (skipped N keys)", "Mismatch F ..."
        return sum(
            1
            for ln in text.splitlines()
            if f in ln
            and (
                "unmatched keys" in ln
                or "Mismatch" in ln
                or "version mismatch" in ln
                or ("(skipped " in ln and "(skipped 0 keys)" not in ln)
            )
        )
    return sum(1 for ln in text.splitlines() if f"{f} didn't match keys" in ln)


def log_errors(text: str) -> tuple[list, list]:
    """Tracebacks in the web UI's log: (those through Weightsmith's code or with its "⚠ unexpected"
    message, the host's own, e.g. a built-in script whose package is missing), each as the line before
    the traceback and its last line."""
    lines = text.splitlines()
    ours, host = [], []
    for i, ln in enumerate(lines):
        if "⚠ unexpected" in ln:
            ours.append(ln.strip())
        elif "Traceback (most recent call last)" in ln:
            block = [ln]
            for nxt in lines[i + 1 : i + 200]:
                if not nxt.strip():
                    break
                block.append(nxt)
            (ours if any("weightsmith" in b.lower() for b in block) else host).append(
                (lines[i - 1].strip() if i else "") + " | " + block[-1].strip()
            )
    return ours[:5], host[:5]


def main(url: str, log: str | None, host: str = "a1111") -> dict:
    url = url.rstrip("/")
    res: dict = {}
    api = requests.Session()

    def t2i(prompt):
        r = api.post(url + "/sdapi/v1/txt2img", json=dict(T2I, prompt=prompt), timeout=600)
        r.raise_for_status()
        im = Image.open(io.BytesIO(base64.b64decode(r.json()["images"][0]))).convert("RGB")
        return np.asarray(im).astype(np.int16)

    def diff(a, b):
        d = np.abs(a - b)
        return {"mean": round(float(d.mean()), 4), "max": int(d.max())}

    def opts(**kw):
        api.post(url + "/sdapi/v1/options", json=kw, timeout=600).raise_for_status()

    c = Client(url + "/", verbose=False)

    def tab(api_name, *args):
        t = time.time()
        out = c.predict(*args, api_name=api_name)
        status = out[0] if isinstance(out, (list, tuple)) else out
        res.setdefault("timings_s", {})[api_name.strip("/") + f"#{len(res['timings_s'])}"] = round(time.time() - t, 1)
        print("PARTIAL " + json.dumps(res), flush=True)  # what a run cut off by its timeout had reached
        return str(status)

    # live previews by "Approx NN" make A1111 fetch vaeapprox-sdxl.pt at every txt2img of an SDXL model
    # (processing.py: sd_vae_approx.model()); offline that fails the request. Previews only: the
    # images below are full VAE decodes either way.
    opts(show_progress_type="Approx cheap")
    model0 = api.get(url + "/sdapi/v1/options", timeout=60).json()["sd_model_checkpoint"]
    res["model"] = model0
    res["persistent_cond_cache"] = api.get(url + "/sdapi/v1/options", timeout=60).json().get("persistent_cond_cache")

    base = t2i(P)
    res["base_repeat_equal"] = bool(np.array_equal(base, t2i(P)))

    # two LoRAs made by the tab (nothing applied: each is a freshly computed edit)
    res["save_lora_b"] = tab("/weightsmith_save_lora", *EDIT_B, "ws-real-b", 0, "lora")

    # Apply, then the same prompt at once
    res["apply"] = tab("/weightsmith_apply", *EDIT_A, 1.0)
    applied = t2i(P)
    t2i(Q)
    applied_re = t2i(P)
    res["applied_vs_recomputed"] = diff(applied, applied_re)
    res["applied_vs_base"] = diff(applied, base)

    # Save the applied edit as LoRA and as checkpoint
    res["save_lora_a"] = tab("/weightsmith_save_lora", *EDIT_A, "ws-real-a", 0, "lora")
    res["save_ckpt"] = tab("/weightsmith_save_checkpoint", *EDIT_A, "ws-real-ckpt")

    # Lora-extension coexistence: edit applied, a LoRA active, then its tag changed
    applied_lb = t2i(P + " <lora:ws-real-b:1>")
    applied_lb_half = t2i(P + " <lora:ws-real-b:0.5>")
    res["applied_no_lora_again_vs_applied"] = diff(t2i(P), applied)

    res["undo"] = tab("/weightsmith_undo")
    undone = t2i(P)
    res["undo_vs_base"] = diff(undone, base)
    res["undo_bit_exact"] = bool(np.array_equal(undone, base))

    base_lb = t2i(P + " <lora:ws-real-b:1>")
    res["edit_with_lora_b_vs_lora_b_alone"] = diff(applied_lb, base_lb)
    res["lora_b_half_vs_full_with_edit"] = diff(applied_lb_half, applied_lb)
    # the applied edit with LoRA b active vs the edit's own LoRA + LoRA b (both in A1111's Lora ext.)
    res["edit_plus_lora_b_vs_lora_a_plus_lora_b"] = diff(applied_lb, t2i(P + " <lora:ws-real-a:1> <lora:ws-real-b:1>"))

    # Undo while a LoRA is active, then without it
    tab("/weightsmith_apply", *EDIT_A, 1.0)
    t2i(P + " <lora:ws-real-b:1>")
    tab("/weightsmith_undo")
    res["undo_under_lora_vs_lora_b_alone"] = diff(t2i(P + " <lora:ws-real-b:1>"), base_lb)
    res["undo_under_lora_then_plain_vs_base"] = diff(t2i(P), base)

    # the saved LoRA on the unedited model
    res["lora_a_vs_applied"] = diff(t2i(P + " <lora:ws-real-a:1>"), applied)

    # the saved checkpoint, loaded back
    api.post(url + "/sdapi/v1/refresh-checkpoints", timeout=600).raise_for_status()
    opts(sd_model_checkpoint="ws-real-ckpt.safetensors")
    res["ckpt_loaded"] = api.get(url + "/sdapi/v1/options", timeout=60).json()["sd_model_checkpoint"]
    res["ckpt_vs_applied"] = diff(t2i(P), applied)
    opts(sd_model_checkpoint=model0)
    res["back_to_base_vs_base"] = diff(t2i(P), base)

    # Merge the two LoRAs: linear, then IterIS with small settings
    c.predict(api_name="/weightsmith_refresh_loras")
    for method, name, it, samples, steps in (
        ("linear", "ws-real-merge-linear", 1, 1, 1),
        ("iteris", "ws-real-merge-iteris", 2, 2, 1),
    ):
        res[f"merge_{method}"] = tab(
            "/weightsmith_merge",
            ["ws-real-a.safetensors", "ws-real-b.safetensors"],
            "",
            "",
            method,
            it,
            samples,
            steps,
            0,
            name,
            0,
            False,
            0,
            "sum",
            "",
        )
        img = t2i(P + f" <lora:{name}:1>")
        res[f"merge_{method}_vs_base"] = diff(img, base)

    # a canary LoRA with one key no layer has: shows the log check below can see a mismatch
    lora_dir = res["save_lora_a"].split("Saved LoRA ", 1)[1].split(" (", 1)[0].rsplit("/", 1)[0]
    import torch
    from safetensors.torch import save_file

    save_file(
        {
            "lora_unet_no_such_block_proj.lora_up.weight": torch.zeros(4, 1),
            "lora_unet_no_such_block_proj.lora_down.weight": torch.zeros(1, 4),
            "lora_unet_no_such_block_proj.alpha": torch.tensor(1.0),
        },
        f"{lora_dir}/ws-real-canary.safetensors",
    )
    api.post(url + "/sdapi/v1/refresh-loras", timeout=600).raise_for_status()
    t2i(P + " <lora:ws-real-canary:1>")

    if log:
        text = open(log, encoding="utf-8", errors="replace").read()
        res["unmatched_key_lines"] = {
            n: unmatched_lines(text, n, host)
            for n in ("ws-real-a", "ws-real-b", "ws-real-merge-linear", "ws-real-merge-iteris", "ws-real-canary")
        }
        res["extension_errors"], res["host_errors"] = log_errors(text)
    return res


if __name__ == "__main__":
    r = main(sys.argv[1], sys.argv[2] if len(sys.argv) > 2 else None, sys.argv[3] if len(sys.argv) > 3 else "a1111")
    print("RESULT " + json.dumps(r))
