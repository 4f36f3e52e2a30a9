#!/usr/bin/env bash
# Create (once, cached) a venv holding the oldest transformers and diffusers that requirements.txt
# allows (its ">=" floors, installed exactly), for tests/test_dependency_floor.py.
#
# torch is the project's CPU wheel (torch==2.13.0), not its floor; huggingface_hub is held below 0.26
# because diffusers 0.27 imports `cached_download`, which huggingface_hub 0.26 removed (diffusers 0.27
# does not pin it itself). Weightsmith is installed editable (--no-deps) from this checkout.
# Idempotent; prints the venv's python on its last line.
#
#   bash tests/floor/setup_env.sh     # -> ~/.cache/weightsmith-tests/floor-venv/bin/python
set -euo pipefail
HERE="$(cd "$(dirname "$0")" && pwd)"
REPO="$(cd "$HERE/../.." && pwd)"
CACHE="${WEIGHTSMITH_TEST_CACHE:-$HOME/.cache/weightsmith-tests}"
VENV="$CACHE/floor-venv"
PY_MAIN="${PYTHON:-python3}"
floor() {   # the version after ">=" of one requirement in requirements.txt
  sed -n "s/^$1>=\([0-9][0-9.]*\).*/\1/p" "$REPO/requirements.txt"
}
TF="$(floor transformers)"; DF="$(floor diffusers)"
[ -n "$TF" ] && [ -n "$DF" ] || { echo "requirements.txt names no transformers/diffusers floor" >&2; exit 1; }
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
"$VENV/bin/python" - "$TF" "$DF" <<'PY' >&2
import sys, transformers, diffusers
from packaging.version import Version
got = (Version(transformers.__version__), Version(diffusers.__version__))
assert got == (Version(sys.argv[1]), Version(sys.argv[2])), got
PY
echo "$STAMP" > "$VENV/.ws-stamp"
echo "$VENV/bin/python"
