#!/usr/bin/env bash
# Create (once, cached) the gradio-3 environment the A1111 tab tests run in.
#
# A1111 v1.10 pins gradio==3.41.2, which needs numpy<2 and pillow<11 and would downgrade the main
# test environment, so it lives in its own venv. torch, transformers, diffusers and weightsmith
# itself come from the main environment through a .pth file that adds the main site-packages
# *after* the venv's own (so the venv's numpy/pillow win). Idempotent; prints the venv's python.
#
#   bash tests/a1111/setup_env.sh          # -> ~/.cache/weightsmith-tests/a1111-gradio3/bin/python
#   bash tests/a1111/setup_env.sh forge    # Forge's gradio 4.40 (optional; needs transformers 4.x
#                                          # and huggingface_hub<1 in the venv, as Forge has)
set -euo pipefail
KIND="${1:-a1111}"
if [ "$KIND" = "forge" ]; then
  VENV="${WEIGHTSMITH_FORGE_VENV:-$HOME/.cache/weightsmith-tests/forge-gradio4}"
  STAMP="gradio==4.40.0 fastapi==0.112.4 starlette==0.38.6 transformers==4.46.3 diffusers==0.31.0 v1"
else
  VENV="${WEIGHTSMITH_A1111_VENV:-$HOME/.cache/weightsmith-tests/a1111-gradio3}"
  STAMP="gradio==3.41.2 fastapi==0.110.3 starlette==0.37.2 v2"
fi
PY_MAIN="${PYTHON:-python3}"
MAIN_SITE="$("$PY_MAIN" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"

if [ -f "$VENV/.ws-stamp" ] && [ "$(cat "$VENV/.ws-stamp")" = "$STAMP|$MAIN_SITE" ] \
   && "$VENV/bin/python" -c "import gradio, torch" >/dev/null 2>&1; then
  echo "$VENV/bin/python"
  exit 0
fi
rm -rf "$VENV"
mkdir -p "$(dirname "$VENV")"
"$PY_MAIN" -m venv "$VENV"
if [ "$KIND" = "forge" ]; then
  {
    "$VENV/bin/python" -m pip install -q --disable-pip-version-check gradio==4.40.0 transformers==4.46.3 \
      diffusers==0.31.0 huggingface_hub==0.36.0
    "$VENV/bin/python" -m pip install -q --disable-pip-version-check --no-deps fastapi==0.112.4 starlette==0.38.6
  } 1>&2
  WANT=4.40.0
else
  {
    "$VENV/bin/python" -m pip install -q --disable-pip-version-check gradio==3.41.2
    # gradio 3.41 renders its page with the pre-1.0 Starlette TemplateResponse signature
    "$VENV/bin/python" -m pip install -q --disable-pip-version-check --no-deps fastapi==0.110.3 starlette==0.37.2
  } 1>&2
  WANT=3.41.2
fi
SITE="$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
# addsitedir also runs the main env's .pth files (the editable weightsmith install among them)
echo "import site; site.addsitedir('$MAIN_SITE')" > "$SITE/zz_weightsmith_main_site.pth"
"$VENV/bin/python" -c "import gradio, torch, diffusers, transformers; assert gradio.__version__ == '$WANT'" 1>&2
echo "$STAMP|$MAIN_SITE" > "$VENV/.ws-stamp"
echo "$VENV/bin/python"
