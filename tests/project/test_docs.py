"""The documentation site builds with ``mkdocs build --strict``: no broken link, anchor or
API reference, no page left out of the nav, on the front page (the README) as on the guides."""

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_mkdocs_builds_strict(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "-f", str(ROOT / "mkdocs.yml"), "-d", str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env=dict(os.environ, NO_MKDOCS_2_WARNING="1"),  # Material's banner about its successor
        timeout=300,
    )
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-4000:]
    assert not re.search(r"^(WARNING|ERROR)\b", log, flags=re.M), log[-4000:]
    front = (tmp_path / "index.html").read_text()
    # the front page is the README, its links into docs/ pointing at the site's pages
    assert "<!-- demo-output -->" in (ROOT / "README.md").read_text() and 'href="trainer/"' in front
    assert (tmp_path / "reference" / "gft_kernels" / "index.html").read_text().count('id="gft_kernels.') >= 14
