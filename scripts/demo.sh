#!/usr/bin/env bash
# The README's main command: sets up .venv if needed, then runs the embedded demo
# (`gft-train` with no arguments) on the CPU. Extra arguments go to `gft-train demo`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/gft-train demo "$@"
