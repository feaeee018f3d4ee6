#!/usr/bin/env bash
# Regenerates the reproduction study: every run (3 seeds per configuration; about 30 minutes on
# a 2-core CPU), docs/reproduction.md and its plots. Finished runs in runs/study are reused;
# delete that folder to start over.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python -m study --out runs/study --docs docs "$@"
