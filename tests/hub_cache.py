"""A saved model folder put into a Hugging Face Hub cache under a repository id, as ``hf download``
would leave it: with ``HF_HUB_OFFLINE=1`` and ``HF_HUB_CACHE`` at that cache, ``from_pretrained(id)``
reads it by the id, through the Hub code path, with no network."""

from __future__ import annotations

import shutil
from pathlib import Path

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def put_in_hub_cache(folder: Path, repo_id: str, cache: Path, commit: str = COMMIT, ref: str = "main") -> Path:
    """Copies ``folder``'s files into ``cache`` as snapshot ``commit`` of model ``repo_id``, named
    by ``ref``; returns the snapshot folder."""
    repo = Path(cache) / ("models--" + repo_id.replace("/", "--"))
    snapshot = repo / "snapshots" / commit
    shutil.copytree(folder, snapshot, dirs_exist_ok=True)
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / ref).write_text(commit)
    return snapshot
