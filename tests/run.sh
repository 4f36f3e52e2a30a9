#!/usr/bin/env bash
# Set up and run the whole test suite (the README's second command calls this; so does .ci/run).
#
#   bash tests/run.sh                 # everything: lint + format check, the suite, the dependency floor
#   bash tests/run.sh -m "not slow and not host"   # any arguments go to pytest, and only pytest runs
#
# Tiers (markers registered in pyproject.toml): `slow` (a test of 20 s or more on 2 cores), `host` (runs
# in a real host's environment: ComfyUI, gradio 3; builds a cached venv the first time). The fast
# developer loop is in CONTRIBUTING.md.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip install -q torch==2.13.0 -e ".[test]"
if [ $# -gt 0 ]; then
  exec python3 -m pytest -q "$@"
fi
echo "== lint and format (ruff)"
python3 -m ruff check .
python3 -m ruff format --check .
echo "== the dependency floor (transformers and diffusers at their declared minimum)"
python3 tests/floor/run_floor.py
echo "== the suite"
python3 -m pytest -q
