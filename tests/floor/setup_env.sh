#!/usr/bin/env bash
# Create (once, cached) a venv holding the given transformers and diffusers versions exactly: the
# ">=" floors of requirements.txt, which tests/test_dependency_floor.py reads and passes in.
#
# torch is the project's CPU wheel (torch==2.13.0), not its floor; huggingface_hub is held below 0.26
# because diffusers 0.27 imports `cached_download`, which huggingface_hub 0.26 removed (diffusers 0.27
# does not pin it itself). Weightsmith is installed editable (--no-deps) from this checkout.
# Idempotent; prints the venv's python on its last line.
#
#   bash tests/floor/setup_env.sh 4.30.2 0.27   # -> ~/.cache/weightsmith-tests/floor-venv/bin/python
set -euo pipefail
HERE="$(cd "$(dirname "$0")" && pwd)"
REPO="$(cd "$HERE/../.." && pwd)"
CACHE="${WEIGHTSMITH_TEST_CACHE:-$HOME/.cache/weightsmith-tests}"
VENV="$CACHE/floor-venv"
PY_MAIN="${PYTHON:-python3}"
[ $# -eq 2 ] || { echo "usage: $0 TRANSFORMERS_VERSION DIFFUSERS_VERSION" >&2; exit 2; }
TF="$1"; DF="$2"
PINS="torch==2.13.0 transformers==$TF diffusers==$DF huggingface_hub<0.26 peft==0.10.0 pytest>=7"
STAMP="$PINS|$REPO|v1"
if [ -f "$VENV/.ws-stamp" ] && [ "$(cat "$VENV/.ws-stamp")" = "$STAMP" ] \
   && "$VENV/bin/python" -c "import torch, transformers, diffusers" >/dev/null 2>&1; then
  echo "$VENV/bin/python"
  exit 0
fi
rm -rf "$VENV"
mkdir -p "$CACHE"
"$PY_MAIN" -m venv "$VENV"
# shellcheck disable=SC2086
{ "$VENV/bin/python" -m pip install -q --disable-pip-version-check $PINS 2>&1 \
    | grep -v "is ignored: it is neither a file nor a directory" || true; } >&2
"$VENV/bin/python" -m pip install -q --disable-pip-version-check --no-deps -e "$REPO" 2>&1 \
  | grep -v "is ignored: it is neither a file nor a directory" >&2 || true
"$VENV/bin/python" -c "import torch, transformers, diffusers, peft, pytest" >&2 \
  || { echo "the floor venv is incomplete" >&2; exit 1; }
echo "$STAMP" > "$VENV/.ws-stamp"
echo "$VENV/bin/python"
