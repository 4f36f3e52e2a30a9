"""The tab under gradio 3.41.2 (A1111 v1.10's pin), driven over HTTP with gradio_client.

gradio 3.41.2 needs numpy<2/pillow<11, so it runs in its own cached venv
(tests/a1111/setup_env.sh, created on first use: ~1 min with PyPI, ~1 s afterwards). The drivers
run there in a subprocess; what they produced is checked here, in the main environment, against
independent computations (core's loader, a fresh erase, diffusers' kohya reader).
Set WEIGHTSMITH_SKIP_GRADIO3=1 to skip (e.g. offline).
"""

import json
import os
import socket
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
import ws_timeouts as T  # noqa: E402

HERE = Path(__file__).resolve().parent
A1111 = HERE / "a1111"


pytestmark = pytest.mark.host  # runs in a real host's environment (tests/run.sh: the "host" tier)


@pytest.fixture(scope="module")
def venv_python():
    if os.environ.get("WEIGHTSMITH_SKIP_GRADIO3") == "1":
        pytest.skip("WEIGHTSMITH_SKIP_GRADIO3=1")
    r = T.run(
        ["bash", str(A1111 / "setup_env.sh")],
        what="the Gradio 3 venv set-up",
        capture_output=True,
        text=True,
        timeout=900,
        env=dict(os.environ, PYTHON=sys.executable),
    )
    assert r.returncode == 0, f"gradio-3 venv setup failed:\n{r.stderr[-3000:]}"
    return r.stdout.strip().splitlines()[-1]


def _port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _drive(py, script, work, *extra):
    env = dict(os.environ, GRADIO_ANALYTICS_ENABLED="False", HF_HUB_OFFLINE="1", no_proxy="127.0.0.1,localhost")
    r = T.run(
        [py, str(A1111 / script), str(work), str(_port()), *extra],
        what=f"the Gradio tab run {script}",
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
    )
    line = next((ln for ln in r.stdout.splitlines() if ln.startswith("RESULT ")), None)
    assert r.returncode == 0 and line, f"{script} failed (rc {r.returncode}):\n{r.stdout[-2000:]}\n{r.stderr[-4000:]}"
    return json.loads(line[len("RESULT ") :])


def test_standalone_tab_end_to_end(venv_python, tmp_path):
    from diffusers import StableDiffusionPipeline

    from weightsmith.core.erase import EraseOptions, erase
    from weightsmith.core.lora_read import load_lora
    from weightsmith.core.model_io import load_model

    res = _drive(venv_python, "drive_standalone.py", tmp_path)
    assert res["gradio"] == "3.41.2"
    assert res["apply_status"].startswith("Applied") and res["changed"] == len(res["edited"]) > 0
    assert res["apply_max_err"] == 0.0
    assert res["undo_bit_exact"] is True and "restored exactly" in res["undo_status"]
    assert res["weights_untouched_by_save"] is True
    assert res["empty_target_status"].startswith("⚠") and "Targets" in res["empty_target_status"]
    assert res["bad_lora_status"].startswith("⚠") and "nope.safetensors" in res["bad_lora_status"]
    assert res["page_ok"]
    (lora_path,) = [Path(p) for p in res["lora_files"]]

    # the saved LoRA equals a fresh erase with the same inputs (core's reader, independent of the tab)
    model = load_model(res["model"])
    edit = erase(
        model,
        ["cat"],
        ["dog"],
        [],
        method="erasepro",
        options=EraseOptions(
            tokens="suffix",
            te_sublayers=("k_proj", "v_proj"),
            expand_prompts=False,
            lam=0.5,
            eta_preserve=1.0,
            rcond=1e-4,
        ),
    )
    lora = load_lora(lora_path, model)
    # the edited modules, plus zero q_proj/out_proj entries beside each edited text-encoder k/v
    # (diffusers recognises kohya text-encoder keys only with an out_proj among them; issue 12)
    siblings = {
        n.rsplit(".", 1)[0] + "." + s
        for n in edit.deltas
        if n.startswith("text_encoder")
        for s in ("q_proj", "out_proj")
    }
    assert set(lora.modules) == set(edit.deltas) | siblings and not lora.unmatched
    for n, d in edit.deltas.items():
        assert torch.allclose(lora.modules[n].delta(), d, atol=1e-5 * max(1.0, float(d.abs().max()))), n
    assert all(float(lora.modules[n].delta().abs().max()) == 0.0 for n in siblings)

    # and diffusers reads it as a kohya LoRA covering the same modules
    sd, alphas = StableDiffusionPipeline.lora_state_dict(str(lora_path))
    flat = " ".join(sd)
    assert "unet." in flat and "text_encoder." in flat
    n_up = sum(k.endswith(("lora_B.weight", "lora.up.weight")) for k in sd)
    assert n_up == len(edit.deltas) + len(siblings)


def test_a1111_and_forge_entry_script_apply_undo_save(venv_python, tmp_path):
    res = _drive(venv_python, "drive_a1111_tab.py", tmp_path / "a1111")
    assert res["tabs"] == [["Weightsmith", "weightsmith"]] and res["backend"] == "A1111Backend"
    assert res["model_info"] == "Model: base.safetensors (SD1.x)"
    assert res["apply_status"].startswith("Applied") and res["apply_exact"] is True
    assert res["changed"] and all("attn2.to_k" in k or "attn2.to_v" in k for k in res["changed"])
    assert res["undo_bit_exact"] is True
    assert res["lora_files"] == ["tab-lora.safetensors"]
    assert res["state_after"] == {"job": "", "job_count": 0}

    # Forge (stand-in, tests/a1111/fake_forge): Apply reaches the weights Forge samples with
    res = _drive(venv_python, "drive_a1111_tab.py", tmp_path / "forge", "forge")
    assert res["tabs"] == [["Weightsmith", "weightsmith"]] and res["backend"] == "ForgeBackend"
    assert res["model_info"] == "Model: base.safetensors (SD1.x)"
    assert res["apply_status"].startswith("Applied") and res["apply_exact"] is True
    assert res["changed"] and all("attn2.to_k" in k or "attn2.to_v" in k for k in res["changed"])
    assert res["undo_status"].startswith("Undone") and res["undo_bit_exact"] is True
    assert res["lora_files"] == ["tab-lora.safetensors"]
    assert res["state_after"] == {"job": "", "job_count": 0}


@pytest.mark.skipif(
    os.environ.get("WEIGHTSMITH_TEST_FORGE_GRADIO4") != "1",
    reason="Forge's gradio 4.40 venv is optional (WEIGHTSMITH_TEST_FORGE_GRADIO4=1; ~2 min to build)",
)
def test_tab_under_forge_gradio4(tmp_path):
    """Forge runs gradio 4.40 with transformers 4.x: the same tab, standalone and through the
    entry script (Apply/Undo through the Forge stand-in's patchers), in that environment."""
    r = T.run(
        ["bash", str(A1111 / "setup_env.sh"), "forge"],
        what="the Forge venv set-up",
        capture_output=True,
        text=True,
        timeout=900,
        env=dict(os.environ, PYTHON=sys.executable),
    )
    assert r.returncode == 0, r.stderr[-3000:]
    py = r.stdout.strip().splitlines()[-1]
    res = _drive(py, "drive_standalone.py", tmp_path / "s")
    assert res["gradio"] == "4.40.0" and res["apply_max_err"] == 0.0 and res["undo_bit_exact"] is True
    assert len(res["lora_files"]) == 1
    res = _drive(py, "drive_a1111_tab.py", tmp_path / "f", "forge")
    assert res["backend"] == "ForgeBackend" and res["apply_status"].startswith("Applied")
    assert res["apply_exact"] is True and res["undo_bit_exact"] is True
    assert res["lora_files"] == ["tab-lora.safetensors"]
