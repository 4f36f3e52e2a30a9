"""SD2 and SDXL: the adapter against ComfyUI's real CLIP/model classes (run in the ComfyUI venv
by tests/comfy/inproc_adapters.py; asserted here). SD1 is covered end to end by
tests/test_comfy_server.py."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent / "comfy"))
import harness as H  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
import ws_timeouts as T  # noqa: E402

pytestmark = pytest.mark.host  # runs in a real host's environment (tests/run.sh: the "host" tier)


@pytest.fixture(scope="module")
def measured():
    if H.skip_requested():
        pytest.skip("WEIGHTSMITH_SKIP_COMFY is set (developer escape hatch; CI runs these tests)")
    try:
        H.run_setup(checkpoint=False)
    except H.SetupError as e:
        pytest.fail(f"the ComfyUI test environment could not be set up: {e}")
    r = T.run(
        [str(H.VENV_PY), str(H.HERE / "inproc_adapters.py"), str(H.COMFY)],
        what="the ComfyUI adapter run",
        env=H.venv_env(),
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert r.returncode == 0, r.stderr[-5000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


def test_sd2_adapter_matches_comfyui(measured):
    r = measured["sd2"]
    assert r["family"] == "sd2" and r["te_layers"] == {"text_encoder": 24} and r["context_dim"] == 1024
    assert r["effective_weight_err"] < 1e-6  # upstream patches are part of the weights read
    assert r["cond_shape"] == [1, 77, 1024]
    assert r["cond_rel_err"] < 1e-4  # penultimate layer + final LN, pad "!"
    assert r["clip_skip"] == 2 and r["cond_skip_rel_err"] < 1e-4 and r["cond_skip_differs"] > 1e-2
    assert r["inputs_untouched"]
    assert r["patched_weight_err"] < 1e-6 and r["loaded_weight_err"] < 1e-6


def test_sdxl_adapter_matches_comfyui(measured):
    r = measured["sdxl"]
    assert r["family"] == "sdxl" and r["context_dim"] == 2048
    assert r["te_layers"] == {"text_encoder": 12, "text_encoder_2": 32}
    assert r["effective_weight_err"] < 1e-6
    assert r["cond_shape"] == [1, 77, 2048]
    assert r["cond_rel_err"] < 1e-4  # cat(L penultimate, G penultimate), no final LN
    assert r["pooled_rel_err"] < 1e-4  # projected pooled output of bigG
    assert r["inputs_untouched"]
    assert r["patched_weight_err"] < 1e-6 and r["loaded_weight_err"] < 1e-6


@pytest.mark.parametrize("family", ["sd2", "sdxl"])
def test_our_loras_load_exactly_in_comfyui_loraloader(measured, family):
    """Erase (all three methods; erasepro with its text-encoder part) and merge LoRAs written by core, applied by
    ComfyUI's own LoraLoader path: every key loads, the applied deltas equal the edit's to 1e-5 of
    ‖ΔW‖ beyond the float32 rounding of the stored sum W + ΔW (reported as ``float32_floor``;
    issue 12)."""
    res = measured[family]["loraloader"]
    assert set(res) == {"erasepro", "zero-residual", "uce", "merge-concat"}
    for label, r in res.items():
        assert r["n_not_loaded"] == 0, (label, r["not_loaded"])
        assert r["modules"] > 0 and r["max_rel_err"] <= 1e-5 + r["float32_floor"], (label, r)
    print(
        f"ComfyUI LoraLoader {family}: "
        + ", ".join(f"{k} {v['max_rel_err']:.1e} (float32 floor {v['float32_floor']:.1e})" for k, v in res.items())
    )
