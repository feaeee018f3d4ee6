#!/usr/bin/env bash
# The README's main command: sets up .venv if needed, then runs the project's main job.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/python ]; then
    python3 -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q "torch==2.13.0" -e ".[test]"
exec .venv/bin/python -m gft_kernels "$@"
