"""The documentation's pages, whose code blocks the tests run: README.md (the front page) and
the guides, docs/*.md. A block is found by the marker on its first line wherever it lives."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def pages() -> list[Path]:
    """README.md, then docs/*.md in name order."""
    return [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def python_blocks(marker: str) -> list[tuple[str, Path]]:
    """Every ```python block whose first line starts with ``# tested: <marker>``, with its page,
    in page order and in order within a page."""
    found = []
    for page in pages():
        for block in re.findall(r"```python\n(.*?)```", page.read_text(), flags=re.S):
            if block.startswith(f"# tested: {marker}"):
                found.append((block, page))
    return found


def page_holding(text: str) -> Path:
    """The one page that contains ``text``."""
    [page] = [p for p in pages() if text in p.read_text()]
    return page
