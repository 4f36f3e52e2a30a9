"""install.py: harmless without A1111's ``launch`` (ComfyUI-Manager), pins the host's packages with it."""

import sys
import types


def test_nothing_missing_does_nothing(install_py, monkeypatch):
    calls = []
    monkeypatch.setattr(install_py.subprocess, "check_call", lambda *a, **k: calls.append(a))
    monkeypatch.setattr(install_py, "requirements", lambda: iter(["torch>=1", "safetensors"]))
    install_py.main()
    assert calls == []


def test_without_launch_uses_plain_pip(install_py, monkeypatch):
    calls = []
    monkeypatch.setitem(sys.modules, "launch", None)  # `import launch` raises ImportError
    monkeypatch.setattr(install_py.subprocess, "check_call", lambda cmd, **k: calls.append(cmd))
    monkeypatch.setattr(install_py, "requirements", lambda: iter(["ws-surely-not-installed-pkg>=1", "torch"]))
    install_py.main()
    assert calls == [[sys.executable, "-m", "pip", "install", "ws-surely-not-installed-pkg>=1"]]


def test_under_a1111_holds_installed_host_packages(install_py, monkeypatch):
    from importlib import metadata

    got = []
    launch = types.ModuleType("launch")
    launch.run_pip = lambda args, desc=None, live=None: got.append(args)
    monkeypatch.setitem(sys.modules, "launch", launch)
    monkeypatch.setattr(install_py, "requirements", lambda: iter(["ws-surely-not-installed-pkg>=1"]))
    install_py.main()
    assert len(got) == 1 and got[0].startswith("install ")
    assert '"ws-surely-not-installed-pkg>=1"' in got[0]
    assert f'"torch=={metadata.version("torch")}"' in got[0]  # the host's torch is held


def test_a_too_old_version_counts_as_missing(install_py, monkeypatch):
    """install.py checks the versions in requirements.txt, not only presence (issue 12)."""
    from importlib import metadata

    have = metadata.version("safetensors")
    assert install_py.missing([f"safetensors>={have}", "safetensors"]) == []
    assert install_py.missing(["safetensors>=999", "safetensors<0.0.1"]) == ["safetensors>=999", "safetensors<0.0.1"]
    calls = []
    monkeypatch.setitem(sys.modules, "launch", None)
    monkeypatch.setattr(install_py.subprocess, "check_call", lambda cmd, **k: calls.append(cmd))
    monkeypatch.setattr(install_py, "requirements", lambda: iter(["safetensors>=999"]))
    install_py.main()
    assert calls == [[sys.executable, "-m", "pip", "install", "safetensors>=999"]]


def test_under_a1111_a_too_old_pinned_package_is_reported_not_upgraded(install_py, monkeypatch, capsys):
    from importlib import metadata

    got = []
    monkeypatch.setitem(sys.modules, "launch", types.SimpleNamespace(run_pip=lambda a, d: got.append(a)))
    monkeypatch.setattr(install_py, "requirements", lambda: iter(["safetensors>=999"]))
    install_py.main()
    assert got == []
    out = capsys.readouterr().out
    assert f"safetensors=={metadata.version('safetensors')}" in out and "not upgraded" in out
