"""The tab in a REAL AUTOMATIC1111 v1.10.1 or a REAL Forge, when ``WEIGHTSMITH_A1111_DIR`` /
``WEIGHTSMITH_FORGE_DIR`` names a build: once per family whose random checkpoint the build holds
(:data:`CHECKPOINTS`; SD1, SD2, SDXL), the web UI started with ``--ckpt`` on it.

A build (docs/a1111.md, "A real A1111 for tests"): ``DIR/webui`` (the web UI with a checkpoint in
``models/Stable-diffusion``), ``DIR/venv`` (its python) and, for A1111, ``DIR/hf`` (the offline
Hugging Face cache; Forge ships its tokenizers). This test copies the current checkout over
``webui/extensions/weightsmith``, removes what an earlier run saved (``ws-real-*``), starts the web
UI on a free loopback port (CPU, ``--loglevel DEBUG`` so A1111's Lora extension logs unmatched keys;
Forge's prints them always), runs ``tests/a1111/drive_real_a1111.py`` with the web UI's own python,
and stops it. ≈ 4–6 minutes per family on 2 CPU cores; at its peak, in float32, 13–14 GB for SD1.5
and 17–17.5 GB for SD2 (measured VmHWM). SDXL: Forge in fp16 21 minutes, under 20 GB in use; A1111 in
float32 34 minutes at 24 GB resident + 17 GB swap (its Lora extension backs up every weight,
docs/a1111.md).
"""

import json
import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
HOSTS = {
    "a1111": (
        "WEIGHTSMITH_A1111_DIR",
        "a real A1111 v1.10.1 build (webui/, venv/, hf/)",
        ["--use-cpu", "all", "--no-half", "--precision", "full", "--no-download-sd-model"],
    ),
    "forge": (
        "WEIGHTSMITH_FORGE_DIR",
        "a real Forge build (webui/, venv/)",
        ["--always-cpu", "--all-in-fp32", "--no-download-sd-model"],
    ),
}


#: what a family changes in a host's arguments (an argument -> what replaces it): SDXL in Forge runs
#: in fp16 (its VAE in float32). A float32 SDXL in Forge (14 GB) beside the tab's model of the file
#: (8.4 GB: the file's fp16 UNet and float32 text encoders, docs/a1111.md "Forge") does not fit a 24 GB
#: machine; A1111's tab reads the web UI's own float32 weights instead (no second model), so A1111
#: keeps float32.
FAMILY_ARGS = {("forge", "sdxl"): {"--all-in-fp32": ["--all-in-fp16", "--vae-in-fp32"]}}


#: how long the driver may take per family: a float32 SDXL in A1111 (14 GB, and the Lora extension's
#: CPU backup of every weight once a LoRA is used, docs/a1111.md) swaps on a 24 GB machine
DRIVER_TIMEOUT_S = {"sdxl": 4000}


#: the random-weight checkpoint of each family in a build's models/Stable-diffusion (docs/a1111.md
#: says how each is made); the web UI is started with it (--ckpt)
CHECKPOINTS = {"sd1": "random-sd15.safetensors", "sd2": "random-sd2.safetensors", "sdxl": "random-sdxl.safetensors"}


pytestmark = pytest.mark.host  # runs in a real host's environment (tests/run.sh: the "host" tier)


def _host_params():
    for host, (var, what, _) in HOSTS.items():
        for family, ckpt in CHECKPOINTS.items():
            root = os.environ.get(var)
            skip = (
                f"{var} is not set: it names {what}, see docs/a1111.md 'A real A1111 for tests'"
                if not root
                else None
                if (Path(root) / "webui" / "models" / "Stable-diffusion" / ckpt).is_file()
                else f"{root} has no models/Stable-diffusion/{ckpt} (the {family} checkpoint; docs/a1111.md "
                "says how to make one)"
            )
            yield pytest.param(
                (host, family), id=f"{host}-{family}", marks=pytest.mark.skipif(skip is not None, reason=skip or "")
            )


def _port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _copy_checkout(dst: Path):
    """Tracked and untracked-but-not-ignored files of the checkout (what a git clone would hold)."""
    files = (
        subprocess.run(
            ["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=REPO, check=True, capture_output=True
        )
        .stdout.decode()
        .split("\0")
    )
    part = dst.with_name(dst.name + ".part")
    shutil.rmtree(part, ignore_errors=True)
    for f in filter(None, files):
        src = REPO / f
        if src.is_file():
            (part / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, part / f)
    shutil.rmtree(dst, ignore_errors=True)
    part.rename(dst)


@pytest.fixture(scope="module", params=list(_host_params()))
def webui(request, tmp_path_factory):
    host, family = request.param
    var, _, host_args = HOSTS[host]
    swap = FAMILY_ARGS.get((host, family), {})
    host_args = [b for a in host_args for b in swap.get(a, [a])]
    root = Path(os.environ[var])
    w, py = root / "webui", root / "venv" / "bin" / "python"
    assert (w / "launch.py").is_file() and py.is_file(), f"{root} is not a web UI build (no webui/launch.py, venv/)"
    _copy_checkout(w / "extensions" / "weightsmith")
    for d in (w / "models" / "Lora", w / "models" / "Stable-diffusion"):
        for f in d.glob("ws-real-*"):
            f.unlink()
    log = tmp_path_factory.mktemp(f"{host}-{family}") / "webui.log"
    port = _port()
    env = dict(
        os.environ,
        HF_HOME=str(root / "hf"),
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        GRADIO_ANALYTICS_ENABLED="False",
        no_proxy="127.0.0.1,localhost",
    )
    env.pop("PYTHONPATH", None)
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [
                str(py),
                "launch.py",
                "--skip-prepare-environment",
                "--skip-torch-cuda-test",
                *host_args,
                "--ckpt",
                str(w / "models" / "Stable-diffusion" / CHECKPOINTS[family]),
                "--api",
                "--server-name",
                "127.0.0.1",
                "--port",
                str(port),
                "--loglevel",
                "DEBUG",
            ],
            cwd=w,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        import urllib.request

        deadline = time.time() + 300
        while True:
            assert proc.poll() is None, f"the web UI exited:\n{log.read_text(errors='replace')[-3000:]}"
            try:
                with urllib.request.urlopen(url + "/sdapi/v1/options", timeout=5) as r:
                    if json.load(r).get("sd_model_checkpoint"):
                        break
            except Exception:
                pass
            assert time.time() < deadline, f"the web UI did not come up:\n{log.read_text(errors='replace')[-3000:]}"
            time.sleep(2)
        yield {"host": host, "family": family, "url": url, "log": log, "python": py, "proc": proc}
    finally:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(30)
        except ProcessLookupError:  # it exited by itself (the assertion above says why)
            pass
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)


def _peak_rss_gb(pid):
    try:
        for ln in Path(f"/proc/{pid}/status").read_text().splitlines():
            if ln.startswith("VmHWM:"):
                return round(int(ln.split()[1]) / 2**20, 2)
    except OSError:
        return None


def test_tab_in_real_webui(webui):
    try:
        r = subprocess.run(
            [
                str(webui["python"]),
                str(HERE / "a1111" / "drive_real_a1111.py"),
                webui["url"],
                str(webui["log"]),
                webui["host"],
            ],
            capture_output=True,
            text=True,
            timeout=DRIVER_TIMEOUT_S.get(webui["family"], 1800),
        )
    except subprocess.TimeoutExpired as e:
        out = e.stdout.decode(errors="replace") if isinstance(e.stdout, bytes) else (e.stdout or "")
        last = next((ln for ln in reversed(out.splitlines()) if ln.startswith("PARTIAL ")), "PARTIAL (nothing)")
        pytest.fail(
            f"the driver ran past {e.timeout} s; it had reached:\n{last}\n"
            f"{webui['log'].read_text(errors='replace')[-3000:]}"
        )
    line = next((ln for ln in r.stdout.splitlines() if ln.startswith("RESULT ")), None)
    assert r.returncode == 0 and line, (
        f"driver failed:\n{r.stdout[-2000:]}\n{r.stderr[-4000:]}\n{webui['log'].read_text(errors='replace')[-3000:]}"
    )
    res = json.loads(line[len("RESULT ") :])
    res["webui_peak_rss_gb"] = _peak_rss_gb(webui["proc"].pid)
    print(json.dumps(res, indent=1))
    same = {"mean": 0.0, "max": 0}
    assert res["base_repeat_equal"], "txt2img is not deterministic here; nothing below can be judged"
    assert res["apply"].startswith("Applied"), res["apply"]
    assert res["applied_vs_recomputed"] == same, "stale cond cache: the first image after Apply is not the edit's"
    assert res["applied_vs_base"]["mean"] > 0.5, "Apply did not change the image"
    assert res["undo_bit_exact"] and res["undo"].startswith("Undone"), (res["undo"], res["undo_vs_base"])
    # the Lora extension and the edit: edit kept when LoRA tags change, LoRA applied once
    assert res["applied_no_lora_again_vs_applied"] == same
    assert res["edit_with_lora_b_vs_lora_b_alone"]["mean"] > 0.5
    assert res["lora_b_half_vs_full_with_edit"]["mean"] > 0.1
    assert res["edit_plus_lora_b_vs_lora_a_plus_lora_b"]["mean"] < 0.05
    assert res["undo_under_lora_vs_lora_b_alone"] == same
    assert res["undo_under_lora_then_plain_vs_base"] == same
    # saved LoRA through <lora:…:1>, saved checkpoint loaded back
    assert "Saved the applied edit" in res["save_lora_a"] and "exact" in res["save_lora_a"]
    assert res["lora_a_vs_applied"]["mean"] < 0.05 and res["lora_a_vs_applied"]["max"] <= 2
    assert res["ckpt_loaded"].startswith("ws-real-ckpt.safetensors")
    assert res["ckpt_vs_applied"]["mean"] < 0.1 and res["ckpt_vs_applied"]["max"] <= 2
    assert res["back_to_base_vs_base"] == same
    # merges, and every LoRA the tab wrote matched A1111's layers (the canary shows the check sees misses)
    for m in ("linear", "iteris"):
        assert res[f"merge_{m}"].startswith("Saved LoRA"), res[f"merge_{m}"]
        assert res[f"merge_{m}_vs_base"]["mean"] > 0.5
    un = res["unmatched_key_lines"]
    assert un.pop("ws-real-canary") >= 1, "the unmatched-key check cannot see a mismatch (log level?)"
    assert all(v == 0 for v in un.values()), un
    assert res["extension_errors"] == []
