#!/usr/bin/env bash
# The README's main command: sets up .venv if needed, then runs the embedded demo
# (`gft-train` with no arguments) on the CPU. Extra arguments go to `gft-train demo`.
# One thread: the tiny model gains little from more, and the printed numbers then do not
# depend on the machine's core count.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
exec .venv/bin/gft-train demo "$@"
