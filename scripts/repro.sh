#!/usr/bin/env bash
# Regenerates the reproduction study in its three regimes: each regime's set-up (base and teacher
# models; the expert is the task's solver), the learning-rate grids, every run (3 seeds per main
# configuration, 2 per sweep point; two one-thread processes side by side: 36 minutes on a 2-core
# CPU, 2026-12-07), docs/reproduction.md, docs/reproduction.json and the plots. Finished runs in
# runs/study are reused; delete that folder to start over.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python -m study --out runs/study --docs docs "$@"
