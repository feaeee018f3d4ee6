"""Which groups each step trains on.

Groups are online (``refresh_every`` N: rebuilt from the next prompts with the current weights
every N steps; N = 1, every step as the authors' trainer, is the default for a mix with
self-samples) or offline (``refresh_every`` 0: built once, or read from ``groups_file``). The
data order is a stateless stream of per-epoch shuffles, so the position after a resume is just
the step. Groups are built on the main process (``build``) and shared with the others.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch

from .groups import Group, load_groups, save_groups


def stream_index(n: int, position: int, seed: int) -> int:
    """Index of the item at ``position`` of an endless stream of per-epoch shuffles of n items."""
    epoch, offset = divmod(position, n)
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return int(torch.randperm(n, generator=g)[offset])


class GroupPool:
    """The current groups (``groups``) and the step at which they begin (``start``, online).

    ``build(rows, seed)`` makes groups of prompt rows (with the current weights); ``save_to`` is
    where offline groups built here are written (main process only, else None)."""

    def __init__(
        self,
        cfg,
        rows,
        build: Callable[[list, int], list[Group]],
        save_to: Path | None,
        groups: list[Group] | None = None,
    ):
        self.cfg, self.rows, self.build, self.save_to = cfg, rows, build, save_to
        self.groups = groups
        self.start = 0

    def for_step(self, step: int) -> list[Group]:
        """The ``prompts_per_step`` groups of step ``step`` (0-based)."""
        cfg = self.cfg
        per_step = cfg.prompts_per_step
        if not cfg.refresh_every:
            if self.groups is None:
                self.groups = self._offline()
            n = len(self.groups)
            return [self.groups[stream_index(n, step * per_step + j, cfg.seed)] for j in range(per_step)]
        if self.groups is None or step - self.start >= cfg.refresh_every:
            self.start = step - step % cfg.refresh_every
            first, count = self.start * per_step, cfg.refresh_every * per_step
            rows = [self.rows[stream_index(len(self.rows), first + j, cfg.seed)] for j in range(count)]
            self.groups = self.build(rows, cfg.seed + self.start)
        offset = (step - self.start) * per_step
        return self.groups[offset : offset + per_step]

    def _offline(self) -> list[Group]:
        if self.cfg.groups_file:  # (read at start; here after a resume without groups)
            return load_groups(self.cfg.groups_file)
        groups = self.build(self.rows, self.cfg.seed)
        if self.save_to is not None:
            self.save_to.parent.mkdir(parents=True, exist_ok=True)
            save_groups(groups, self.save_to)
        return groups
