"""The CUDA kernels compile for sm_90 here, without a GPU, and fit it (registers, shared
memory, pipelined loops). Runs in a subprocess: the test session itself has Triton's
interpreter switched on, which replaces the jit functions."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # (tests/conftest.py: `pytest -m "not slow"` is the quick subset)

ROOT = Path(__file__).resolve().parents[2]


def _run(*args):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = str(ROOT)
    return subprocess.run(
        [sys.executable, "-m", "benchmarks.kernel_resources", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )


@pytest.mark.parametrize("which", [[], ["--sweep"]], ids=["defaults", "tuning-candidates"])
def test_every_cuda_variant_compiles_and_fits_sm90(which):
    done = _run("--check", *which)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "pipelined" in done.stdout and "PROBLEM" not in done.stdout


def test_the_probe_sees_unpipelined_loops():
    """Sizes that are not multiples of 16 defeat the pipeliner (a slower but correct path for odd
    hidden sizes): the probe must tell the difference, or the check above could not fail."""
    done = _run("--unaligned")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "NOT pipelined" in done.stdout
