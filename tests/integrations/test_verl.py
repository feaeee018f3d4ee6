"""GFT in verl (policy loss, fused log-prob op), checked against the installed verl 0.9.1.

verl pins transformers < 5.11, so it lives in its own virtual environment: ``scripts/test.sh``
builds ``.venv-verl`` and sets GFT_REQUIRE_VERL=1, and this test runs ``tests/verl_checks.py``
there with pytest. A developer without that environment sees it skipped.
"""

import os
import subprocess
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # (tests/conftest.py: `pytest -m "not slow"` is the quick subset)

ROOT = Path(__file__).resolve().parents[2]
VERL_PYTHON = Path(os.environ.get("GFT_VERL_PYTHON", ROOT / ".venv-verl" / "bin" / "python"))


def test_verl_checks_pass_in_the_verl_environment():
    if not VERL_PYTHON.exists():
        if os.environ.get("GFT_REQUIRE_VERL") == "1":
            pytest.fail(f"no verl environment at {VERL_PYTHON} (scripts/test.sh creates it)")
        pytest.skip(f"no verl environment at {VERL_PYTHON}")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("TRITON_INTERPRET", None)
    env.pop("GFT_TAU", None)
    proc = subprocess.run(
        [str(VERL_PYTHON), str(ROOT / "tests" / "verl_checks.py"), "-rA"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-3000:]
    assert " passed" in proc.stdout and "failed" not in proc.stdout.splitlines()[-1], proc.stdout[-3000:]
