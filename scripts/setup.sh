#!/usr/bin/env bash
# Creates .venv with the project and its test extras (CPU torch 2.13.0 is pinned: an unpinned
# torch would pull a multi-GB CUDA build). Safe to rerun.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/python ]; then
    python3 -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q "torch==2.13.0" -e ".[test]"
