#!/usr/bin/env bash
# The README's test command: sets up .venv (CPU torch, pinned so no CUDA build is pulled)
# and runs the whole test suite. Safe to rerun.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/python ]; then
    python3 -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q "torch==2.13.0" -e ".[test]"
exec .venv/bin/python -m pytest -q "$@"
