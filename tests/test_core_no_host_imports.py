"""Core never imports a host: ``weightsmith.core`` works with ComfyUI, A1111 and Gradio absent.

Two checks, both able to fail:
- at run time, in a fresh interpreter whose import system refuses ``comfy``, ``modules`` (A1111),
  ``gradio`` and ``folder_paths`` (and records every attempt): import every module under
  ``weightsmith.core``, and call the tokenizer lookup (which once tried ``import comfy`` inside the
  function); no host module may be loaded, and none may even be asked for;
- statically, no ``import``/``from … import`` of a host package anywhere in ``core/`` source (function
  bodies included, which importing a module does not execute).
"""

from __future__ import annotations

import ast
import json
import os
import sys
import textwrap
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import ws_timeouts as T  # noqa: E402

HOSTS = ("comfy", "modules", "gradio", "folder_paths")
CORE = Path(__file__).resolve().parents[1] / "core"

_CHILD = textwrap.dedent("""
    import importlib, json, pkgutil, sys, traceback

    HOSTS = set(json.loads(sys.argv[1]))
    attempts = []

    class Refuse:
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in HOSTS:
                attempts.append(name)
                raise ImportError(f"host package {name!r} is not importable in this test")
            return None

    sys.meta_path.insert(0, Refuse())

    import weightsmith.core as core

    failed, imported = [], []
    for info in pkgutil.walk_packages(core.__path__, "weightsmith.core.",
                                      onerror=lambda name: failed.append((name, traceback.format_exc()))):
        try:
            importlib.import_module(info.name)
            imported.append(info.name)
        except BaseException:
            failed.append((info.name, traceback.format_exc()))

    from weightsmith.core.tokenizer import find_clip_tokenizer, write_word_vocab
    tok = find_clip_tokenizer(write_word_vocab(sys.argv[2]))
    assert tok.model_max_length == 77

    print(json.dumps({"imported": imported, "failed": failed, "attempts": attempts,
                      "loaded": sorted(m for m in sys.modules if m.split(".")[0] in HOSTS)}))
""")


def test_core_imports_without_hosts(tmp_path):
    env = dict(
        os.environ,
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        OMP_NUM_THREADS="1",
        XDG_CACHE_HOME=str(tmp_path / "cache"),
    )
    proc = T.run(
        [sys.executable, "-c", _CHILD, json.dumps(HOSTS), str(tmp_path / "tok")],
        what="the host-import check",
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert not out["failed"], "\n".join(f"{n}:\n{tb}" for n, tb in out["failed"])
    # the walk really covered core (solvers, merge, I/O, CLI)
    for name in (
        "weightsmith.core.erase.solvers",
        "weightsmith.core.merge.iteris",
        "weightsmith.core.tokenizer",
        "weightsmith.core.model_io",
        "weightsmith.core.cli",
    ):
        assert name in out["imported"]
    assert out["loaded"] == [], f"host modules loaded by core: {out['loaded']}"
    assert out["attempts"] == [], f"core tried to import host modules: {out['attempts']}"


def test_core_source_has_no_host_import():
    found = []
    for path in sorted(CORE.rglob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            for n in names:
                if n.split(".")[0] in HOSTS:
                    found.append(f"{path.relative_to(CORE.parent)}:{node.lineno}: import {n}")
    assert not found, "core imports a host:\n" + "\n".join(found)


def test_comfy_adapter_still_offers_comfyuis_tokenizer(tmp_path, monkeypatch):
    """The ComfyUI tokenizer folder moved from core into the adapter: a CLIP without an HF tokenizer
    still gets ComfyUI's ``comfy/sd1_tokenizer`` (here a word vocabulary, told apart by its size)."""
    import types

    from weightsmith.core.naming import TE1
    from weightsmith.core.tokenizer import EOS, write_word_vocab
    from weightsmith.nodes import comfy_adapter as ca

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.delenv("WEIGHTSMITH_TOKENIZER", raising=False)
    fake = types.ModuleType("comfy")
    fake.__file__ = str(tmp_path / "comfy" / "__init__.py")
    write_word_vocab(tmp_path / "comfy" / "sd1_tokenizer", words=("zebra", "quokka"))
    monkeypatch.setitem(sys.modules, "comfy", fake)
    assert ca.comfy_tokenizer_dirs() == [tmp_path / "comfy" / "sd1_tokenizer"]
    clip = types.SimpleNamespace(tokenizer=types.SimpleNamespace(clip_l=types.SimpleNamespace(tokenizer=None)))
    tok = ca.comfy_tokenizers(clip, "sd1")[TE1]
    assert len(tok) == 512 + 2 + len("zebra") - 1 + len("quokka") - 1  # bytes, </w> bytes, merges, BOS/EOS
    assert tok.model_max_length == 77 and tok.pad_token == EOS
    monkeypatch.delitem(sys.modules, "comfy")
    monkeypatch.setattr(ca, "comfy_tokenizer_dirs", lambda: [])
    assert len(ca.comfy_tokenizers(clip, "sd1")[TE1]) == 49408  # the bundled CLIP vocabulary
