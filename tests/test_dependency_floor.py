"""The declared dependency floors are one set: pyproject.toml (pip) and requirements.txt (ComfyUI-Manager,
install.py) name the same ``>=`` versions. Whether the suite passes *on* those floors is its own step of
``tests/run.sh`` (``tests/floor/run_floor.py``), not a test inside the suite."""

import importlib.util
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _run_floor():
    spec = importlib.util.spec_from_file_location("ws_run_floor", REPO / "tests" / "floor" / "run_floor.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_pyproject_and_requirements_declare_the_same_floors(install_py):
    """pip reads pyproject.toml, ComfyUI-Manager and install.py read requirements.txt: one floor each."""
    tomllib = pytest.importorskip("tomllib")
    floors = _run_floor().floors
    req = floors(install_py.requirements())
    pyp = floors(tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"])
    pyp.pop("torch")  # torch: every host brings its own build
    assert req == pyp
    assert {"transformers", "diffusers"} <= set(req)


def test_the_floor_step_runs_test_files_that_exist():
    """Every file the floor step runs is in tests/ (a renamed file would otherwise drop out of it)."""
    files = _run_floor().FILES
    missing = [f for f in files if not (REPO / "tests" / f).is_file()]
    assert not missing, missing
    assert len(files) == len(set(files))
