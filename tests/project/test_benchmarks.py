"""The benchmark harness runs on the CPU (quick mode), and the GPU check script in dry mode."""

import csv
import subprocess
from pathlib import Path

import pytest

from benchmarks.run import main

pytestmark = pytest.mark.slow  # (tests/conftest.py: `pytest -m "not slow"` is the quick subset)

ROOT = Path(__file__).resolve().parents[2]


def _rows(path):
    with open(path) as f:
        return list(csv.DictReader(f))


def test_quick_benchmark_writes_rows_plots_and_precision(tmp_path):
    csv_path = main(["--quick", "--out", str(tmp_path)])
    rows = _rows(csv_path)
    timed = [r for r in rows if r["status"] == "ok"]
    assert {"gft_torch", "naive_eager", "liger_grpo_chunked"} <= {r["provider"] for r in timed}
    for r in timed:
        assert float(r["fwd_bwd_ms"]) > 0 and float(r["fwd_bwd_over_floor"]) > 0
        assert r["device"] and r["torch"] and r["date"] and int(r["v"]) > 0
    sweep = {float(r["zero_adv_frac"]) for r in timed if r["provider"] == "gft_torch"}
    assert {0.0, 0.5, 0.9} <= sweep
    prec = {r["provider"]: r for r in rows if r["status"] == "precision"}
    assert float(prec["gft_torch"]["err_dweight"]) < 1e-5  # fp32 on the CPU
    assert float(prec["gft_torch"]["err_loss"]) < 1e-5
    assert float(prec["liger_grpo_chunked"]["err_dhidden"]) < 1e-4
    assert list(tmp_path.glob("*.png"))


def test_gpu_check_runs_dry(tmp_path):
    out = tmp_path / "gpu"
    proc = subprocess.run(
        ["bash", "benchmarks/gpu_check.sh", str(out), "--dry"], cwd=ROOT, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "tests exit: 0" in (out / "tests.log").read_text()
    assert (out / "tests.xml").exists() and (out / "environment.txt").exists()
    assert list(out.glob("*.csv")) and list(out.glob("*.png"))
    tune = list(out.glob("tune_*.csv"))
    assert tune and "forward" in tune[0].read_text() and "backward" in tune[0].read_text()


def test_packing_benchmark_measures_both_layouts_on_the_demo_groups():
    from benchmarks.packing import demo_groups
    from benchmarks.packing import main as packing_main
    from gft_train.demo import sums

    seqs = demo_groups(2)  # 8 responses a prompt, the demo's mix; the first is the expert's demonstration
    numbers = [int(x) for x in seqs[0][0].rstrip("=").split("+")]
    assert len(seqs) == 16 and seqs[0][1] == sums.write(numbers, "reversed") == sums.make_data(0)["train"][0]["expert"]
    result = packing_main(["--steps", "1", "--repeats", "1", "--micro-batch-size", "16"])
    run = result["runs"][0]
    assert run["padded_tokens_per_s"] > 0 and run["packed_tokens_per_s"] > 0
    assert 0 < result["lengths"]["min"] <= result["lengths"]["median"] <= result["lengths"]["max"] <= 32
    assert 0 <= result["lengths"]["padding_frac"] < 1


def test_packing_benchmark_measures_groups_whose_lengths_spread():
    from benchmarks.packing import main as packing_main

    argv = ["--steps", "1", "--repeats", "2", "--micro-batch-size", "16", "--spread", "10-60"]
    result = packing_main(argv)
    assert result["shape"]["max_length"] == 60 and result["shape"]["packed_layout"] == "best-fit rows"
    assert 10 <= result["lengths"]["min"] < result["lengths"]["max"] <= 60
    assert result["lengths"]["padding_frac"] > 0.2  # spread lengths pad a lot
    assert result["packed_over_padded"]["n"] == 2
    pairs = result["step_pairs_padded_over_packed_time"]  # one timed step a repeat, both layouts
    assert pairs["n"] == 2 and 0 < pairs["min"] <= pairs["median"] <= pairs["max"]


def test_cpu_ratio_times_both_providers_in_each_round(tmp_path):
    from benchmarks.cpu_ratio import main as ratio_main

    path = ratio_main(["--threads", "1", "--rounds", "2", "--shapes", "cpu-small-N1024", "--out", str(tmp_path)])
    rows = _rows(path)
    assert [int(r["round"]) for r in rows] == [0, 1]
    assert [r["first"] for r in rows] == ["naive_eager", "gft_torch"]  # alternating order
    for r in rows:
        assert r["threads"] == "1" and r["cpu"] and int(r["nproc"]) >= 1 and r["date"]
        naive, gft = float(r["naive_eager_ms"]), float(r["gft_torch_ms"])
        assert naive > 0 and gft > 0 and abs(float(r["ratio"]) - gft / naive) < 1e-3


def test_the_benchmark_has_rows_for_the_log_prob_op(tmp_path):
    """``gft_kernels.logprobs`` beside materialized log-softmax: timed, and its error against the
    float64 reference of -mean(A logp)."""
    rows = _rows(main(["--quick", "--providers", "logprobs,logprobs_naive", "--out", str(tmp_path)]))
    timed = {r["provider"] for r in rows if r["status"] == "ok" and float(r["fwd_bwd_ms"]) > 0}
    assert timed == {"logprobs", "logprobs_naive"}
    prec = {r["provider"]: r for r in rows if r["status"] == "precision"}
    assert float(prec["logprobs"]["err_dweight"]) < 1e-5 and float(prec["logprobs"]["err_loss"]) < 1e-5


def test_train_memory_follows_the_weights_the_gradients_and_the_optimizer_states():
    """The training-step probe of benchmarks/train_memory.py, on a small Llama shape: the peak
    holds at least weights, gradients and two AdamW states (16 bytes a parameter in fp32, 8 in
    bf16: the states follow the weights' dtype), and a LoRA run trains and keeps states for the
    adapter alone."""
    from benchmarks.train_memory import step_peak

    shape = dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2, vocab_size=256)
    fp32, bf16, lora = (
        step_peak(1, w, False, True, lora_r=r, shape=shape)
        for w, r in (("float32", 0), ("bfloat16", 0), ("bfloat16", 4))
    )
    assert (fp32["state_dtype"], bf16["state_dtype"], lora["state_dtype"]) == ("float32", "bfloat16", "float32")
    assert fp32["peak_bytes_per_param"] >= 16 and bf16["peak_bytes_per_param"] >= 8
    assert fp32["trainable_m"] == pytest.approx(fp32["params_m"], abs=0.05)
    assert 0 < lora["trainable_m"] < lora["params_m"] / 4
