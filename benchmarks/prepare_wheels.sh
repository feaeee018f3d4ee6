#!/usr/bin/env bash
# Download, on a machine with network, the pure-Python wheels the GPU machine lacks (Python 3.12).
set -euo pipefail
cd "$(dirname "$0")/.."
# the baselines, and pytest-xdist (with execnet) so the CUDA tests compile their kernels in parallel
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 -d wheels \
    "liger-kernel==0.8.5" "cut-cross-entropy==25.1.1" "pytest-xdist==3.8.0" "execnet==2.1.2"
ls wheels
