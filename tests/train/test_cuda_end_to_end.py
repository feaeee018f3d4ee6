"""gft-train end to end, as the GPU check runs it (issue 23): the command line in a subprocess
trains a tiny model built from a config and saved to disk, with self-samples from the transformers
rollout engine, is killed after a checkpoint and resumed from it.

The same test runs on CUDA with the Triton engine (and bf16, as a GPU run trains), and on the CPU
with the chunked torch engine and with Triton's interpreter, so it is proven here before any GPU
sees it. Every run is made in a process where the packages the GPU machine lacks cannot be
imported (``ABSENT``): that machine has torch, triton, transformers with its dependencies,
accelerate, pytest, hypothesis, matplotlib and numpy, and no network.
"""

import json
import math
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]

# installed here (the trainer's extras, or what they bring), absent on the GPU machine
ABSENT = ("datasets", "math_verify", "tensorboard", "trl", "vllm", "deepspeed", "peft", "pyarrow", "pandas")
# `python -c` with these unimportable (None in sys.modules: `import x` fails as for a package that is
# not there, and importlib.util.find_spec says absent), then the CLI as `python -m gft_train.cli` runs it
CLI = (
    f"import runpy, sys; sys.modules.update(dict.fromkeys({ABSENT!r})); "
    "runpy.run_module('gft_train.cli', run_name='__main__')"
)

STEPS, SAVE_EVERY, KILLED_AT = 16, 4, 11  # killed as step 11 starts: steps 1-10 logged, checkpoints 4 and 8


def _env(device: str, backend: str) -> dict:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
    env.pop("TRITON_INTERPRET", None)  # (tests/conftest.py sets it where there is no GPU)
    if device == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""  # the CPU even on a GPU machine
        if backend == "triton":
            env["TRITON_INTERPRET"] = "1"
    return env


def cli(args, device="cpu", backend="torch", env_extra=None) -> subprocess.CompletedProcess:
    env = {**_env(device, backend), **(env_extra or {})}
    cmd = [sys.executable, "-c", CLI, *map(str, args)]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny Qwen2 (1 layer, hidden 64, a 19-token character vocabulary) saved to disk, and
    three-number sums whose demonstrations are scratchpads ("12+13+1=" -> "1+13=14+12=26")."""
    from gft_train.demo.model import build_model
    from gft_train.demo.sums import sum_row
    from gft_train.demo.task import write_jsonl

    d = tmp_path_factory.mktemp("e2e")
    rng = random.Random(0)
    rows = [sum_row([rng.randint(0, 19) for _ in range(3)], "reversed") for _ in range(64)]
    return dict(model=build_model(d / "model", hidden_size=64, layers=1), train=write_jsonl(rows, d / "sums.jsonl"))


def train_args(tiny, out, backend, device) -> list:
    # GFT without DCR (tau = 0): the loss is then sum(-A log p) / tokens, which falls as the
    # expert's scratchpads (13 tokens, A > 0) become likely; with DCR its value, -A p log p, first
    # rises with p. One expert and two self-samples of at most 4 tokens per prompt; the reward
    # reads the final number, so the samples of an untrained model score 0 and every group has
    # a signal.
    return [
        "train",
        "--model", tiny["model"],
        "--train-file", tiny["train"],
        "--output-dir", out,
        "--loss-backend", backend,
        "--engine", "transformers",
        "--reward", "gft_train.demo.sums:reward",
        "--report-to", "none",
        "--method", "gft",
        "--n-teacher", "0",
        "--n-self", "2",
        "--no-dcr",
        "--max-new-tokens", "4",
        "--max-length", "24",
        "--prompts-per-step", "4",
        "--lr", "3e-3",
        "--lr-scheduler", "constant",
        "--max-steps", STEPS,
        "--save-every", SAVE_EVERY,
        *(["--bf16"] if device == "cuda" else []),
    ]  # fmt: skip


def _metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def _complete_checkpoints(out: Path) -> list[int]:
    return sorted(
        json.loads((d / "trainer_state.json").read_text())["step"]
        for d in (out / "checkpoints").glob("step-*")
        if (d / "trainer_state.json").is_file()
    )


def _weights(path: Path, prefix: str = "") -> dict:
    from safetensors.torch import load_file

    return {k.removeprefix(prefix): v.float() for k, v in load_file(str(path)).items()}


def _assert_decreases(losses: list[float]):
    assert all(math.isfinite(x) for x in losses), losses
    k = len(losses) // 3
    first, last = sum(losses[:k]) / k, sum(losses[-k:]) / k
    assert last < 0.9 * first, (first, last, losses)  # (CPU, 10 steps, 18 seeds and inits: last/first 0.70-0.85)


VARIANTS = [
    pytest.param("cpu", "torch", id="cpu-torch"),
    pytest.param(  # the trainer's Triton path on the CPU; where CUDA is, cuda-triton runs the real kernels
        "cpu",
        "triton",
        id="cpu-triton-interpreter",
        marks=[
            pytest.mark.slow,
            pytest.mark.skipif(torch.cuda.is_available(), reason="cuda-triton runs the real kernels here"),
        ],
    ),
    pytest.param(
        "cuda",
        "triton",
        id="cuda-triton",
        marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (the GPU check runs it)"),
    ),
]


@pytest.mark.parametrize("device,backend", VARIANTS)
def test_gft_train_learns_checkpoints_and_resumes(tiny, tmp_path, device, backend):
    out = tmp_path / "run"
    args = train_args(tiny, out, backend, device)
    # (on CUDA, --loss-backend triton without the interpreter refuses CPU tensors: a run that
    # trains at all trained on the GPU)
    killed = cli(args, device, backend, env_extra={"GFT_FAULT_AT_STEP": str(KILLED_AT)})
    assert killed.returncode == -9, killed.stderr[-3000:]  # SIGKILL in the middle of the run
    before = _metrics(out)
    assert [m["step"] for m in before] == list(range(1, KILLED_AT))
    _assert_decreases([m["loss"] for m in before])
    # every step sampled from the policy with the transformers engine, and the groups had a signal
    assert all(m["completions/self_mean_tokens"] > 0 and m["adv/expert_mean"] > 0 for m in before)
    assert _complete_checkpoints(out) == [4, 8] and not (out / "final").exists()

    resumed = cli([*args, "--resume"], device, backend)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    said = resumed.stdout + resumed.stderr
    assert "resumed from" in said and "(step 8)" in said, said[-3000:]
    after = _metrics(out)
    assert [m["step"] for m in after] == list(range(1, STEPS + 1))  # the killed run's steps 9-10 replaced
    # the weights, optimizer, RNG and groups came back: step 9 is the killed run's step 9 again
    # (the same samples of the same weights), where weights from the start would score ~25% higher
    assert after[8]["loss"] == pytest.approx(before[8]["loss"], rel=1e-3, abs=1e-4), (before[8], after[8])
    _assert_decreases([m["loss"] for m in after])
    assert _complete_checkpoints(out) == [4, 8, 12, 16]
    final = _weights(out / "final" / "model.safetensors")
    at_8 = _weights(out / "checkpoints" / "step-8" / "model.safetensors", prefix="model.")
    at_16 = _weights(out / "checkpoints" / "step-16" / "model.safetensors", prefix="model.")
    start = _weights(Path(tiny["model"]) / "model.safetensors")
    assert final.keys() == at_16.keys() == at_8.keys() == start.keys()
    assert max((at_8[k] - start[k]).abs().max().item() for k in start) > 1e-3  # the checkpoint holds trained weights
    assert all(torch.equal(final[k], at_16[k]) for k in final)  # the final model is the last step's
    moved = max((final[k] - at_8[k]).abs().max().item() for k in final)  # and training went on after 8
    assert moved > 1e-3, moved


def test_a_missing_package_stops_the_cli_in_one_line_before_the_model_loads(tiny, tmp_path):
    """The defaults that need a package the GPU machine lacks (reward 'math': math-verify; report_to
    'tensorboard') end the command with one line naming it, before anything loads or trains."""
    base = ["train", "--model", tiny["model"], "--train-file", tiny["train"], "--n-teacher", "0", "--max-steps", "1"]
    base += ["--n-self", "1", "--max-new-tokens", "4", "--max-length", "24", "--engine", "transformers"]
    for out, extra, says in (
        ("math", ["--report-to", "none"], "reward 'math' needs the math-verify package (pip install math-verify)"),
        ("tb", ["--reward", "gft_train.demo.sums:reward"], "the tracker 'tensorboard' is not installed"),
    ):
        run = cli([*base, "--output-dir", tmp_path / out, *extra])
        assert run.returncode == 1, run.stderr[-3000:]
        last = run.stderr.strip().splitlines()[-1]
        assert last.startswith("gft-train: error: ") and says in last, run.stderr[-3000:]
        assert "Loading weights" not in run.stderr  # (transformers' progress bar as the model loads)
        assert not (tmp_path / out).exists()
