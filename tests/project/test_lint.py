"""ruff's lint and format, as configured in pyproject.toml, hold over the whole repository."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _ruff(*args: str) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "ruff", *args], cwd=ROOT, capture_output=True, text=True)
    assert "No module named ruff" not in proc.stderr, "ruff is a test extra: pip install -e '.[test]'"
    return proc


def test_ruff_check_finds_nothing():
    proc = _ruff("check", "--output-format", "concise", ".")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-1000:]


def test_ruff_format_leaves_every_file_as_it_is():
    proc = _ruff("format", "--check", ".")
    assert proc.returncode == 0, "run `ruff format .`:\n" + proc.stdout[-3000:] + proc.stderr[-1000:]
