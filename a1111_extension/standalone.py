"""Serve the Weightsmith tab without A1111: ``python -m weightsmith.a1111_extension.standalone``.

    python -m weightsmith.a1111_extension.standalone [MODEL] --loras DIR --checkpoints DIR --port 7861

MODEL is a diffusers folder or a single-file checkpoint (default: the embedded tiny world model).
Apply edits the model this process loaded (nothing on disk changes until you save).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from .backend import StandaloneBackend


def default_model() -> Path | None:
    try:
        from ..core.world.paths import DEFAULT_MODEL_DIR
    except Exception:
        return None
    return DEFAULT_MODEL_DIR if (Path(DEFAULT_MODEL_DIR) / "model_index.json").exists() else None


def make_app(model, lora_dir, checkpoint_dir, tokenizer=None):
    from .ui import build_ui

    backend = StandaloneBackend(model, lora_dir, checkpoint_dir, tokenizer=tokenizer)
    return build_ui(backend), backend


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="weightsmith-tab", description=__doc__.splitlines()[0])
    ap.add_argument("model", nargs="?", help="diffusers folder or .safetensors checkpoint")
    ap.add_argument("--loras", default="weightsmith-out/loras", help="LoRA folder (read and written)")
    ap.add_argument("--checkpoints", default="weightsmith-out/checkpoints", help="where checkpoints are saved")
    ap.add_argument("--tokenizer", default=None, help="CLIP tokenizer folder for single-file checkpoints")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=7861)
    a = ap.parse_args(argv)
    model = a.model or default_model()
    if model is None:
        ap.error("no model given and the embedded default model is not installed")
    demo, _ = make_app(model, a.loras, a.checkpoints, a.tokenizer)
    demo.queue()
    demo.launch(server_name=a.host, server_port=a.port)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
