#!/usr/bin/env bash
# The project's GPU check (the kernels and the trainer on a real GPU: correctness, the plans,
# the benchmark), one prepared command:
#
#   bash benchmarks/gpu_check.sh OUT_DIR          # on the GPU machine (no network)
#   bash benchmarks/gpu_check.sh OUT_DIR --dry    # on a CPU: the same steps, small and quick (CI)
#
# 1. the kernel correctness suite on CUDA (bf16/fp16/fp32 against float64, small odd shapes and
#    large ones, the chunked engine's path without host syncs), JUnit XML and a log;
# 2. gft-train end to end on CUDA (a tiny model built from a config, the Triton backend, the
#    transformers rollout engine): a finite, falling loss, a checkpoint, a resume;
# 3. the Triton engine's plans head to head at the three target shapes (benchmarks/tune.py:
#    the product's time at each shape, the fused and cuBLAS forwards, the split, cublas and
#    atomic backwards, chunk widths, budgets, each with its peak memory), then the tiles;
# 4. the benchmark: every provider at the three target shapes (Gemma-2-2B, Llama-3-8B,
#    Qwen2.5-7B at 8k tokens), then 90% zero-advantage sequences, then the precision rows;
#    each row's fwd_bwd_over_products is its time over four products of its shape timed in the
#    same run. Everything lands in OUT_DIR, a short table last.
# Budgets (under 8 minutes in all, so a second run fits a 15-minute device session): tests 110 s
# + 70 s (tests/kernels/test_gpu.py alone), trainer 45 s, plans and tiles 70 s, benchmark 175 s;
# each stage is cut at its budget and the next one still runs. More shapes in a second command:
#   python -m benchmarks --out OUT_DIR --models gemma-2-2b,llama-3.1-8b --tokens 4096,16384,32768 --budget-s 450
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
    TESTS=(tests/kernels/test_special_cases.py tests/kernels/test_numerics.py tests/kernels/test_engines.py tests/kernels/test_backends_match_reference.py tests/kernels/test_torch_device_path.py)
    export HYPOTHESIS_PROFILE=gpu
fi
# Most of this stage is Triton compiling a hundred-odd kernel specializations, one at a time per
# process: with pytest-xdist (from wheels/) 8 workers compile in parallel on the GPU machine's cores.
PARALLEL=()
if [ -z "$DRY" ] && "$PY" -c "import xdist" 2>/dev/null; then PARALLEL=(-n 8); fi
timeout 110 "$PY" -m pytest -q ${PARALLEL[@]+"${PARALLEL[@]}"} --junitxml="$OUT/tests.xml" -p no:cacheprovider "${TESTS[@]}" 2>&1 | tee "$OUT/tests.log" | tail -15
echo "tests exit: ${PIPESTATUS[0]}" | tee -a "$OUT/tests.log"
# The large shapes and the peak-memory test alone on the GPU: beside 8 workers they ran out of
# device memory (H100, 2026-11-27), and their peaks would count the others' allocations.
if [ -z "$DRY" ]; then
    timeout 70 "$PY" -m pytest -q -s --junitxml="$OUT/tests_gpu.xml" -p no:cacheprovider tests/kernels/test_gpu.py 2>&1 \
        | tee "$OUT/tests_gpu.log" | grep -E "ratio|triton|passed|failed|FAILED" | tail -30
    echo "gpu tests exit: ${PIPESTATUS[0]}" | tee -a "$OUT/tests_gpu.log"
fi

echo "== 2. gft-train end to end =="
if [ -n "$DRY" ]; then  # the CPU variant runs in the test suite; here only that the check is found
    "$PY" -m pytest -q --collect-only -p no:cacheprovider tests/train/test_cuda_end_to_end.py 2>&1 | tee "$OUT/train.log" | tail -3
else
    timeout 45 "$PY" -m pytest -q --junitxml="$OUT/train.xml" -p no:cacheprovider \
        "tests/train/test_cuda_end_to_end.py::test_gft_train_learns_checkpoints_and_resumes[cuda-triton]" 2>&1 \
        | tee "$OUT/train.log" | tail -15
    echo "train exit: ${PIPESTATUS[0]}" | tee -a "$OUT/train.log"
fi

echo "== 3. plans and tiles =="
if [ -n "$DRY" ]; then
    TRITON_INTERPRET=1 "$PY" -m benchmarks.tune --smoke --out "$OUT" 2>&1 | tee "$OUT/tune.log"
else
    timeout 70 "$PY" -m benchmarks.tune --out "$OUT" --budget-s 55 2>&1 | tee "$OUT/tune.log"
fi

echo "== 4. benchmark =="
if [ -n "$DRY" ]; then
    "$PY" -m benchmarks --quick --out "$OUT" 2>&1 | tee "$OUT/benchmark.log"
else
    timeout 175 "$PY" -m benchmarks --out "$OUT" --budget-s 145 2>&1 | tee "$OUT/benchmark.log"
fi
echo "== done in $(( $(date +%s) - start )) s; results in $OUT =="
ls "$OUT"
