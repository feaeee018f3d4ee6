#!/usr/bin/env bash
# The project's GPU check (the kernels on a real GPU: correctness, tiles, the benchmark), one prepared command:
#
#   bash benchmarks/gpu_check.sh OUT_DIR          # on the GPU machine (no network)
#   bash benchmarks/gpu_check.sh OUT_DIR --dry    # on a CPU: the same steps, small and quick (CI)
#
# 1. the kernel correctness suite on CUDA (bf16/fp16/fp32 against float64, small odd shapes and
#    large ones), results as JUnit XML and a log;
# 2. the tile candidates timed at one shape (benchmarks/tune.py), to choose the defaults;
# 3. the benchmark against the baselines, rows (device, versions, date, shape, provider, time,
#    memory, error) as CSV and plots, and a short table last. Everything lands in OUT_DIR.
# Budgets (under 7 minutes in all, so a second run fits a 15-minute device session): tests
# 120 s + 90 s (tests/kernels/test_gpu.py alone), atomics 20 s, designs and tiles 60 s, benchmark 90 s;
# each stage is cut at its budget and the next one still runs. The benchmark measures
# what the targets need first; the remaining shapes can follow in a second command:
#   python -m benchmarks --out OUT_DIR --budget-s 450
#
# Wheels the GPU machine lacks (liger-kernel, cut-cross-entropy) are prepared beforehand with
# `bash benchmarks/prepare_wheels.sh` into ./wheels (git-ignored) and installed here offline.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${1:?usage: gpu_check.sh OUT_DIR [--dry]}"
DRY="${2:-}"
mkdir -p "$OUT"
PY="${PYTHON:-python3}"
[ -x .venv/bin/python ] && [ -n "$DRY" ] && PY=.venv/bin/python
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
start=$(date +%s)

# The wheels are pure Python: unpacked onto PYTHONPATH they work whatever pip may do there
# (no network, a system Python that refuses installs, no write access to site-packages).
if [ -d wheels ] && ls wheels/*.whl >/dev/null 2>&1 && [ -z "$DRY" ]; then
    SITE="$(mktemp -d)"
    for w in wheels/*.whl; do "$PY" -m zipfile -e "$w" "$SITE"; done
    export PYTHONPATH="$PYTHONPATH:$SITE"
fi
{
    echo "date: $(date -u +%FT%TZ)"
    "$PY" -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, 'cuda', torch.cuda.is_available(), torch.cuda.get_device_name() if torch.cuda.is_available() else 'cpu')"
    nvidia-smi -L 2>/dev/null || true
} | tee "$OUT/environment.txt"

echo "== 1. kernel tests =="
if [ -n "$DRY" ]; then
    TESTS=(tests/kernels/test_special_cases.py tests/kernels/test_gpu.py)
    export HYPOTHESIS_PROFILE=default
else
    TESTS=(tests/kernels/test_special_cases.py tests/kernels/test_numerics.py tests/kernels/test_engines.py tests/kernels/test_backends_match_reference.py)
    export HYPOTHESIS_PROFILE=gpu
fi
# Most of this stage is Triton compiling a hundred-odd kernel specializations, one at a time per
# process: with pytest-xdist (from wheels/) 8 workers compile in parallel on the GPU machine's cores.
PARALLEL=()
if [ -z "$DRY" ] && "$PY" -c "import xdist" 2>/dev/null; then PARALLEL=(-n 8); fi
timeout 120 "$PY" -m pytest -q ${PARALLEL[@]+"${PARALLEL[@]}"} --junitxml="$OUT/tests.xml" -p no:cacheprovider "${TESTS[@]}" 2>&1 | tee "$OUT/tests.log" | tail -15
echo "tests exit: ${PIPESTATUS[0]}" | tee -a "$OUT/tests.log"
# The large shapes and the peak-memory test alone on the GPU: beside 8 workers they ran out of
# device memory (H100, 2026-11-27), and their peaks would count the others' allocations.
if [ -z "$DRY" ]; then
    timeout 90 "$PY" -m pytest -q -s --junitxml="$OUT/tests_gpu.xml" -p no:cacheprovider tests/kernels/test_gpu.py 2>&1 \
        | tee "$OUT/tests_gpu.log" | grep -E "ratio|triton|passed|failed|FAILED" | tail -30
    echo "gpu tests exit: ${PIPESTATUS[0]}" | tee -a "$OUT/tests_gpu.log"
fi

echo "== 2. atomics (the atomic backward design's cost) =="
if [ -n "$DRY" ]; then
    "$PY" -m benchmarks.atomics --ptx 2>&1 | tee "$OUT/atomics.log"
else
    timeout 20 "$PY" -m benchmarks.atomics --out "$OUT" 2>&1 | tee "$OUT/atomics.log"
fi

echo "== 3. designs and tiles =="
if [ -n "$DRY" ]; then
    TRITON_INTERPRET=1 "$PY" -m benchmarks.tune --smoke --out "$OUT" 2>&1 | tee "$OUT/tune.log"
else
    timeout 90 "$PY" -m benchmarks.tune --out "$OUT" --budget-s 60 2>&1 | tee "$OUT/tune.log"
fi

echo "== 4. benchmark =="
if [ -n "$DRY" ]; then
    "$PY" -m benchmarks --quick --out "$OUT" 2>&1 | tee "$OUT/benchmark.log"
else
    # the focus shape, its zero-advantage sweep and precision first, then 4k-32k tokens of each
    # model, within the time budget
    timeout 120 "$PY" -m benchmarks --out "$OUT" --budget-s 90 2>&1 | tee "$OUT/benchmark.log"
fi
echo "== done in $(( $(date +%s) - start )) s; results in $OUT =="
ls "$OUT"
