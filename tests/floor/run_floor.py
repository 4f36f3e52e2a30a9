"""The dependency-floor step of ``tests/run.sh``: Weightsmith on the oldest transformers and
diffusers it declares, run as its own step after the suite (not as a test inside it).

A1111 v1.10 pins transformers 4.30.2 and the extension's install.py keeps it (docs/a1111.md), so
that floor is what A1111 users run. ``setup_env.sh`` beside this file builds a cached venv with the
``>=`` floors of requirements.txt installed exactly (~1 min with PyPI the first time, ~1 s after),
and the test files in :data:`FILES` run there: model loading and writing, the erase and merge
solvers, LoRA reading and writing, the A1111 / Forge backends on their stand-ins, the hostile-input
checks.

Left out there, each for a reason that is diffusers', not Weightsmith's: diffusers' own
``load_lora_weights`` needs diffusers' PEFT backend, which diffusers turns on only with
transformers >= 4.34 (the diffusers-host checks in test_lora_write), and
``UNet2DConditionModel.from_single_file`` arrived after diffusers 0.27 (the independent reader in
test_erase_io). Both run in the main environment.

    python3 tests/floor/run_floor.py          # exit 0: the floor venv's run passed
Set WEIGHTSMITH_SKIP_FLOOR=1 to skip (e.g. offline, in a fast local loop).
"""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
FILES = [
    "test_lora_read.py",
    "test_lora_write.py",
    "test_erase_io.py",
    "test_erase_pipeline.py",
    "test_erase_tokens.py",
    "test_precision.py",
    "test_a1111_adapter.py",
    "test_a1111_workbench.py",
    "test_forge_adapter.py",
    "test_a1111_install.py",
    "test_comfy_pack_light.py",
    "test_merge_baselines.py",
    "test_iteris_properties.py",
    "test_nonfinite_values.py",
    "test_safe_output.py",
    "test_option_validation.py",
    "test_input_validation.py",
    "test_signals.py",
    "test_merge_cli.py",
]
NOT_THERE = "not loads_in_diffusers and not loads_exactly_in_diffusers and not single_file_checkpoint_round_trip"
MIN_PASSED = 150  # a run that collected far fewer tests than these files hold is a broken run


def floors(reqs) -> dict[str, str]:
    """Package name -> the version of its ``>=`` specifier."""
    return {
        canonicalize_name(r.name): s.version for r in map(Requirement, reqs) for s in r.specifier if s.operator == ">="
    }


def requirements() -> list[str]:
    """requirements.txt as install.py reads it (one reader for both)."""
    spec = importlib.util.spec_from_file_location("ws_install_for_floor", REPO / "install.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.requirements()


def main() -> int:
    if os.environ.get("WEIGHTSMITH_SKIP_FLOOR") == "1":
        print("dependency floor: skipped (WEIGHTSMITH_SKIP_FLOOR=1)")
        return 0
    want = floors(requirements())
    tf, df = want["transformers"], want["diffusers"]
    print(f"dependency floor: transformers {tf}, diffusers {df} (requirements.txt)", flush=True)
    r = subprocess.run(
        ["bash", str(HERE / "setup_env.sh"), tf, df],
        capture_output=True,
        text=True,
        env=dict(os.environ, PYTHON=sys.executable),
    )
    if r.returncode:
        print(f"dependency floor: the venv set-up failed:\n{r.stderr[-3000:]}", file=sys.stderr)
        return 1
    py = r.stdout.strip().splitlines()[-1]
    got = subprocess.run(
        [py, "-c", "import transformers, diffusers; print(transformers.__version__, diffusers.__version__)"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    if [Version(v) for v in got] != [Version(tf), Version(df)]:
        print(
            f"dependency floor: the venv holds transformers {got[0]} / diffusers {got[1]}, not the floors",
            file=sys.stderr,
        )
        return 1
    env = dict(os.environ, OMP_NUM_THREADS="1")
    with tempfile.TemporaryDirectory(prefix="ws-floor-") as tmp:
        run = subprocess.run(
            [
                py,
                "-m",
                "pytest",
                "-q",
                "-p",
                "no:cacheprovider",
                "--basetemp",
                str(Path(tmp) / "t"),
                "-k",
                NOT_THERE,
                *[str(REPO / "tests" / f) for f in FILES],
            ],
            capture_output=True,
            text=True,
            cwd=REPO,
            env=env,
            timeout=3600,
        )
    print(run.stdout[-4000:] + run.stderr[-2000:])
    if run.returncode:
        print(f"dependency floor: the suite fails on transformers {got[0]} / diffusers {got[1]}", file=sys.stderr)
        return 1
    passed = re.search(r"(\d+) passed", run.stdout.strip().splitlines()[-1])
    if not passed or int(passed.group(1)) < MIN_PASSED:
        print(f"dependency floor: fewer than {MIN_PASSED} tests passed; the run is incomplete", file=sys.stderr)
        return 1
    print(f"dependency floor: {passed.group(1)} passed on transformers {got[0]} / diffusers {got[1]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
