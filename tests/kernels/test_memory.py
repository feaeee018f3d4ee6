"""Memory: the torch backend's peak on the CPU (ru_maxrss in a fresh process), and the Triton
launcher's planned peak at the GPU shapes."""

import pytest
import torch

from benchmarks.cpu_memory import _StorageTracker, launcher_peak, measure, torch_device_peak
from benchmarks.shapes import GPU_TARGETS, MODELS, TOKENS
from gft_kernels.triton_ops.plans import LaunchOptions, plan_split


@pytest.mark.slow
def test_torch_backend_peak_is_far_below_one_logits_buffer():
    row = measure("torch", n=4096, v=32000, h=256)
    assert row["extra_over_logits"] < 0.25, row


@pytest.mark.slow
def test_torch_backend_peak_with_the_vocabulary_split_between_threads_is_one_threads():
    """At two threads the one-pass path splits the vocabulary between threads (cpu_threads.py):
    the same C x V floats cut between them, and nothing of a call held by a helper thread after
    it (held buffers added a C x V buffer to the peak). One call per process: from the second
    call on, glibc may keep the freed gradient of the call before resident, with one thread or two."""
    one = measure("torch", n=4096, v=32000, h=256, threads=1)
    two = measure("torch", n=4096, v=32000, h=256, threads=2)
    assert two["threads"] == 2 and two["extra_mib"] <= one["extra_mib"] + 8, (one, two)


@pytest.mark.slow
def test_the_probe_sees_materialized_logits():
    """The same probe on the materialized reference must see several N x V buffers, or it
    measures nothing."""
    row = measure("reference", n=4096, v=32000, h=256)
    assert row["extra_over_logits"] > 1.5, row


# The GPU memory targets: the default (split) backward's peak within 1.10x of the gradients at
# every benchmark shape, the atomic design's within 1.05x (for users at the edge of memory), the
# cuBLAS plans' within 1.10x.
# Planned here, on CPU tensors with the kernels and products as no-ops; measured on a GPU by
# tests/kernels/test_gpu.py. Each model's smallest and largest token count.
TARGET = {"split": 1.10, "atomic": 1.05, "cublas": 1.10}


@pytest.mark.slow
@pytest.mark.parametrize("design", list(TARGET))
@pytest.mark.parametrize("model", list(MODELS))
@pytest.mark.parametrize("n", [min(TOKENS), max(TOKENS)])
def test_triton_launcher_peak_is_near_the_gradients(model, n, design):
    h, v = MODELS[model]
    row = launcher_peak(n, v, h, design=design)
    assert row["peak_over_bound"] <= TARGET[design], row


# the scratch each design plans at Gemma-2-2B 8k, at least: the split and cuBLAS plans' 9% budget
# mostly used, the atomic design's 4%
PLANNED = {"split": 1.08, "atomic": 1.035, "cublas": 1.08}


@pytest.mark.parametrize("design", list(TARGET))
def test_the_probe_sees_the_launchers_scratch(design):
    """Between the bounds: a probe that missed the scratch (the op's custom ops run with the
    dispatch mode off, which once hid it all: 1.0003 for every design) reads as a pass above."""
    row = launcher_peak(8192, 256000, 2304, design=design)
    assert PLANNED[design] <= row["peak_over_bound"] <= TARGET[design], row


@pytest.mark.parametrize("design", list(TARGET))
def test_launcher_peak_with_zero_advantages_and_fp32(design):
    assert launcher_peak(4096, 32000, 1024, zero_adv_frac=0.9, design=design)["peak_over_bound"] <= TARGET[design]
    assert launcher_peak(4096, 32000, 1024, dtype=torch.float32, design=design)["peak_over_bound"] <= TARGET[design]


# LaunchOptions.memory: the default ("fast") within 1.15x of the gradients with one vocabulary
# sweep (4 products) at the three target shapes, widening the split design's budget where dH's
# fp32 accumulator needs it; "min" within 1.05x.
MEMORY_TARGET = {"fast": 1.15, "min": 1.05}
# at least: the widened budget mostly used (fast), the 4% budget mostly used (min)
MEMORY_PLANNED = {"fast": 1.13, "min": 1.035}
# Llama-3-8B 8k scaled down (N 4096, V 100000, H 1024): dH's fp32 accumulator and a dz chunk are
# over the 9% budget and within the widened one; within 4%, two sweeps of the split design
SCALED_LLAMA = (4096, 100000, 1024)


@pytest.mark.parametrize("memory", list(MEMORY_TARGET))
def test_the_memory_options_planned_peak_is_between_the_bounds(memory):
    """The probe at a shape that takes the same plans as Llama-3-8B and Qwen2.5-7B 8k: the
    default widened to one sweep, memory="min" two sweeps within 4%; each peak bounded from
    above (the target) and below (the budget used: a plan that ignored the option misses one)."""
    n, v, h = SCALED_LLAMA
    plan = plan_split(n, n, v, h, torch.bfloat16, True, True, LaunchOptions(memory=memory))
    assert plan.products == (4 if memory == "fast" else 5), plan
    row = launcher_peak(n, v, h, memory=memory)
    assert row["memory"] == memory and MEMORY_PLANNED[memory] <= row["peak_over_bound"] <= MEMORY_TARGET[memory], row


@pytest.mark.slow
@pytest.mark.parametrize("memory", list(MEMORY_TARGET))
@pytest.mark.parametrize("shape", GPU_TARGETS, ids=lambda s: s.name)
def test_the_memory_options_planned_peak_at_the_target_shapes(shape, memory):
    row = launcher_peak(shape.n, shape.v, shape.h, memory=memory)
    assert row["peak_over_bound"] <= MEMORY_TARGET[memory], row


def _device_path_bound(row):
    """The chunked engine's device path beyond the gradients, over their bytes: its chunk buffers
    (DEVICE_SCRATCH_FRACTION), the fp32 dhidden accumulator (twice dhidden's bytes), the copy of
    hidden with inactive rows zeroed (once) and, with row blocks, an fp32 chunk of dlm_head; the
    per-chunk partial statistics are the slack."""
    from gft_kernels import torch_backend

    n, v, h = row["n"], row["v"], row["h"]
    dw_chunk = 4 * row["cols"] * h / (2 * h * (n + v)) if row["rows"] < n else 0.0
    return 1 + torch_backend.DEVICE_SCRATCH_FRACTION + 3 * n / (n + v) + dw_chunk + 0.01


@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("shape", [(2048, 32000, 2048), (4096, 32000, 1024)], ids=["one-block", "row-blocks"])
def test_the_chunked_engines_device_path_peak_is_planned(shape, reduction):
    """On a GPU the chunked engine takes its device path (no host sync, every row): its planned
    peak is the gradients plus bounded buffers (it was 2.98x the gradients at Gemma-2-2B 8k on an
    H100, with dlm_head accumulated in fp32)."""
    row = torch_device_peak(*shape, reduction=reduction)
    assert (row["rows"] < row["n"]) == (shape[0] == 4096), row
    assert row["peak_over_bound"] <= _device_path_bound(row), row


@pytest.mark.slow
@pytest.mark.parametrize("model", list(MODELS))
def test_the_chunked_engines_device_path_peak_at_the_gpu_shapes(model):
    h, v = MODELS[model]
    row = torch_device_peak(8192, v, h)
    assert row["rows"] == 8192 and row["peak_over_bound"] <= _device_path_bound(row), row


def test_the_storage_tracker_follows_births_deaths_and_views():
    """The probe behind launcher_peak: peak and live bytes of a known sequence."""
    x = torch.zeros(1000)
    with _StorageTracker(x) as tracker:
        a = torch.empty(1000)  # 4000 B
        b = a.to(torch.float64)  # 8000 B
        view = b[:10]
        del a, b  # b lives on through its view
        c = torch.empty(500)  # 2000 B
        x.reshape(10, 100)  # a view of an input: not new memory
        assert (tracker.live, tracker.peak) == (10000, 12000)
        del view, c
        assert tracker.live == 0


@pytest.mark.slow
def test_vocab_parallel_rank_peak_follows_the_shard():
    """Per rank at Llama-3.1-8B, N = 8192, bf16, the lm_head split over 2 and 4 ranks (planned
    with the launcher probe, README "Measured"): the vocabulary-parallel op's peak stays within
    the split design's target of this rank's gradients, so the rank's memory falls with the
    shard; the gathered-weight baseline holds the full weight and its full gradient. Unsharded,
    the default widens its budget here for one sweep (its target: 1.15x)."""
    from benchmarks.cpu_memory import vocab_parallel_rows

    one, *rows = vocab_parallel_rows("llama-3.1-8b", 8192, ranks=(2, 4))
    assert one["mode"] == "unsharded" and one["peak_over_bound"] <= MEMORY_TARGET["fast"], one
    for vp, gathered in zip(rows[::2], rows[1::2]):
        k = vp["shards"]
        assert vp["mode"] == "vocab-parallel" and gathered["mode"] == "gathered"
        assert vp["peak_over_bound"] <= TARGET["split"], vp
        assert vp["rank_total_mib"] < one["rank_total_mib"] * (1 / k + 0.1), (vp, one)
        assert gathered["rank_total_mib"] > one["rank_total_mib"] + vp["resident_mib"] * 0.9, (gathered, one)


@pytest.mark.slow
def test_logprobs_peak_is_far_below_one_logits_buffer():
    """``gft_kernels.logprobs`` with entropies, forward and backward, on the chunked engine: no
    ``[N x V]`` buffer (the materialized reference's peak, measured alike, is several)."""
    row = measure("torch", n=4096, v=32000, h=256, op="logprobs")
    assert row["op"] == "logprobs" and row["extra_over_logits"] < 0.25, row
