"""MkDocs hook: the site's front page is README.md, so the two never differ.

The README links into the guides as ``docs/<page>.md`` (links that work on GitHub); on the site
the guides sit beside the front page, so those links lose their ``docs/`` prefix.
"""

from __future__ import annotations

import re
from pathlib import Path

from mkdocs.structure.files import File

README = Path(__file__).resolve().parents[1] / "README.md"


def front_page(readme: str) -> str:
    """The README with its links into ``docs/`` made relative to the site's root."""
    return re.sub(r"\]\(docs/", "](", readme)


def on_files(files, config):
    files.append(File.generated(config, "index.md", content=front_page(README.read_text())))
    return files
