#!/usr/bin/env bash
# Set up and run the whole test suite (the README's second command calls this).
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip install -q torch==2.13.0 -e ".[test]"
python3 -m pytest -q "$@"
