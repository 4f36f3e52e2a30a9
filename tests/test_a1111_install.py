"""install.py: harmless without A1111's ``launch`` (ComfyUI-Manager), pins the host's packages with it."""
import importlib.util
import sys
import types
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _install_module():
    spec = importlib.util.spec_from_file_location("ws_install_under_test", ROOT / "install.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_nothing_missing_does_nothing(monkeypatch):
    inst = _install_module()
    calls = []
    monkeypatch.setattr(inst.subprocess, "check_call", lambda *a, **k: calls.append(a))
    monkeypatch.setattr(inst, "requirements", lambda: iter(["torch>=1", "safetensors"]))
    inst.main()
    assert calls == []


def test_without_launch_uses_plain_pip(monkeypatch):
    inst = _install_module()
    calls = []
    monkeypatch.setitem(sys.modules, "launch", None)          # `import launch` raises ImportError
    monkeypatch.setattr(inst.subprocess, "check_call", lambda cmd, **k: calls.append(cmd))
    monkeypatch.setattr(inst, "requirements", lambda: iter(["ws-surely-not-installed-pkg>=1", "torch"]))
    inst.main()
    assert calls == [[sys.executable, "-m", "pip", "install", "ws-surely-not-installed-pkg>=1"]]


def test_under_a1111_holds_installed_host_packages(monkeypatch):
    from importlib import metadata

    inst = _install_module()
    got = []
    launch = types.ModuleType("launch")
    launch.run_pip = lambda args, desc=None, live=None: got.append(args)
    monkeypatch.setitem(sys.modules, "launch", launch)
    monkeypatch.setattr(inst, "requirements", lambda: iter(["ws-surely-not-installed-pkg>=1"]))
    inst.main()
    assert len(got) == 1 and got[0].startswith("install ")
    assert '"ws-surely-not-installed-pkg>=1"' in got[0]
    assert f'"torch=={metadata.version("torch")}"' in got[0]          # the host's torch is held


def test_a_too_old_version_counts_as_missing(monkeypatch):
    """install.py checks the versions in requirements.txt, not only presence (issue 12)."""
    from importlib import metadata

    inst = _install_module()
    have = metadata.version("safetensors")
    assert inst.missing([f"safetensors>={have}", "safetensors"]) == []
    assert inst.missing(["safetensors>=999", "safetensors<0.0.1"]) == ["safetensors>=999", "safetensors<0.0.1"]
    calls = []
    monkeypatch.setitem(sys.modules, "launch", None)
    monkeypatch.setattr(inst.subprocess, "check_call", lambda cmd, **k: calls.append(cmd))
    monkeypatch.setattr(inst, "requirements", lambda: iter(["safetensors>=999"]))
    inst.main()
    assert calls == [[sys.executable, "-m", "pip", "install", "safetensors>=999"]]


def test_under_a1111_a_too_old_pinned_package_is_reported_not_upgraded(monkeypatch, capsys):
    from importlib import metadata

    inst = _install_module()
    got = []
    monkeypatch.setitem(sys.modules, "launch", types.SimpleNamespace(run_pip=lambda a, d: got.append(a)))
    monkeypatch.setattr(inst, "requirements", lambda: iter(["safetensors>=999"]))
    inst.main()
    assert got == []
    out = capsys.readouterr().out
    assert f"safetensors=={metadata.version('safetensors')}" in out and "not upgraded" in out
