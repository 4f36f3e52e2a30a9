"""Weightsmith on the oldest transformers and diffusers it declares.

A1111 v1.10 pins transformers 4.30.2 and the extension's install.py keeps it (docs/a1111.md), so
that floor is what A1111 users run. ``tests/floor/setup_env.sh`` builds a cached venv with the
``>=`` floors of requirements.txt installed exactly (~1 min with PyPI the first time, ~1 s after)
and a selection of this suite runs there in a subprocess: model loading and writing, the erase and
merge solvers, LoRA reading and writing, and the A1111 / Forge backends on their stand-ins.

Left out there, each for a reason that is diffusers', not Weightsmith's: diffusers' own
``load_lora_weights`` needs diffusers' PEFT backend, which diffusers turns on only with
transformers >= 4.34 (the diffusers-host checks in test_lora_write), and
``UNet2DConditionModel.from_single_file`` arrived after diffusers 0.27 (the independent reader in
test_erase_io). Both run in the main environment.
Set WEIGHTSMITH_SKIP_FLOOR=1 to skip (e.g. offline).
"""
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

sys.path.insert(0, str(Path(__file__).parent))
import ws_timeouts as T  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
FILES = ["test_lora_read.py", "test_lora_write.py", "test_erase_io.py", "test_erase_pipeline.py",
         "test_erase_tokens.py", "test_precision.py", "test_a1111_adapter.py", "test_a1111_workbench.py",
         "test_forge_adapter.py", "test_a1111_install.py", "test_comfy_pack_light.py",
         "test_merge_baselines.py", "test_iteris_properties.py", "test_nonfinite_values.py", "test_safe_output.py",
         "test_option_validation.py", "test_input_validation.py", "test_signals.py", "test_merge_cli.py"]
NOT_THERE = "not loads_in_diffusers and not loads_exactly_in_diffusers and not single_file_checkpoint_round_trip"


def _floors(reqs):
    """Package name -> the version of its ``>=`` specifier."""
    return {canonicalize_name(r.name): s.version for r in map(Requirement, reqs) for s in r.specifier
            if s.operator == ">="}


def test_pyproject_and_requirements_declare_the_same_floors(install_py):
    """pip reads pyproject.toml, ComfyUI-Manager and install.py read requirements.txt: one floor each."""
    tomllib = pytest.importorskip("tomllib")
    req = _floors(install_py.requirements())
    pyp = _floors(tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"])
    pyp.pop("torch")                                 # torch: every host brings its own build
    assert req == pyp
    assert {"transformers", "diffusers"} <= set(req)


@pytest.mark.skipif(os.environ.get("WEIGHTSMITH_FLOOR_INNER") == "1", reason="already inside the floor run")
def test_the_suite_passes_on_the_declared_transformers_and_diffusers_floors(install_py, tmp_path):
    if os.environ.get("WEIGHTSMITH_SKIP_FLOOR") == "1":
        pytest.skip("WEIGHTSMITH_SKIP_FLOOR=1")
    want = _floors(install_py.requirements())
    r = T.run(["bash", str(REPO / "tests" / "floor" / "setup_env.sh"), want["transformers"],
               want["diffusers"]], what="the floor venv set-up", capture_output=True, text=True, timeout=900,
                       env=dict(os.environ, PYTHON=sys.executable))
    assert r.returncode == 0, f"floor venv setup failed:\n{r.stderr[-3000:]}"
    py = r.stdout.strip().splitlines()[-1]
    got = subprocess.run([py, "-c", "import transformers, diffusers; print(transformers.__version__, diffusers.__version__)"],
                         capture_output=True, text=True, check=True).stdout.split()
    assert [Version(v) for v in got] == [Version(want["transformers"]), Version(want["diffusers"])]
    env = dict(os.environ, WEIGHTSMITH_FLOOR_INNER="1", OMP_NUM_THREADS="1")
    run = T.run([py, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--basetemp", str(tmp_path / "t"),
                          "-k", NOT_THERE, *[str(REPO / "tests" / f) for f in FILES]],
                         capture_output=True, text=True, timeout=1500, cwd=REPO, env=env, what="the suite under the dependency floors")
    tail = run.stdout[-4000:] + run.stderr[-2000:]
    assert run.returncode == 0, f"the suite fails on transformers {got[0]} / diffusers {got[1]}:\n{tail}"
    passed = re.search(r"(\d+) passed", run.stdout.splitlines()[-1])       # rc 0: nothing failed
    assert passed and int(passed.group(1)) >= 150, tail
