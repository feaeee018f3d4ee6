"""Verifiable rewards.

``math``: rule-based answer checking with math-verify, gold first (``verify(gold, answer)``).
math-verify's own timeouts use ``signal.alarm``, which works only on the main thread. On the main
thread (the trainer's case) checks run in-process under those timeouts. Called from any other
thread, they run in a worker process (where they are on that process's main thread), with a
second, outer time limit in the parent: a check that hangs costs its reward (0), not the run.
That pool uses the ``spawn`` start method, so a script calling it from a thread needs the usual
``if __name__ == "__main__":`` guard.

User functions: ``--reward package.module:function`` with the signature

    function(prompts: list[str], completions: list[str], answers: list[str]) -> list[float]

(one reward per completion, same order; ``None`` is not allowed: return 0.0 for "no reward").
The module is imported as Python would import it, and from the working directory too (as
``python -m`` would; the ``gft-train`` command's own path does not include it): a
``my_rewards.py`` beside the data is ``--reward my_rewards:fn``.
"""

from __future__ import annotations

import importlib
import importlib.util
import math
import multiprocessing as mp
import os
import sys
import threading
from collections.abc import Callable

RewardFn = Callable[[list, list, list], list]


def _verify_one(args) -> float:
    gold, completion, timeout = args
    from math_verify import parse, verify

    try:
        gold_parsed = parse(gold, parsing_timeout=timeout)
        answer_parsed = parse(completion, parsing_timeout=timeout)
        return 1.0 if verify(gold_parsed, answer_parsed, timeout_seconds=timeout) else 0.0
    except Exception:
        return 0.0


class MathReward:
    """Reward 1.0 when the completion's final answer equals the reference, else 0.0."""

    def __init__(self, timeout_s: int = 5, workers: int = 1):
        self._pool = None
        if importlib.util.find_spec("math_verify") is None:  # said now, not at the first score
            raise ValueError(
                "reward 'math' needs the math-verify package (pip install math-verify), "
                "or give --reward package.module:function"
            )
        self.timeout_s = timeout_s
        self.workers = workers

    def _get_pool(self):
        if self._pool is None:
            self._pool = mp.get_context("spawn").Pool(self.workers)
        return self._pool

    def __call__(self, prompts, completions, answers) -> list[float]:
        jobs = [(gold, comp, self.timeout_s) for gold, comp in zip(answers, completions)]
        if threading.current_thread() is threading.main_thread():
            return [_verify_one(job) for job in jobs]
        pending = [self._get_pool().apply_async(_verify_one, (job,)) for job in jobs]
        rewards = []
        for job in pending:
            try:
                rewards.append(job.get(timeout=self.timeout_s * 2 + 5))
            except mp.TimeoutError:
                rewards.append(0.0)
                self.close()  # a stuck worker: start a fresh pool for the rest
        return rewards

    def close(self):
        if self._pool is not None:
            self._pool.terminate()
            self._pool = None

    def __del__(self):
        self.close()


def load_reward(spec: str) -> RewardFn:
    if spec == "math":
        return MathReward()
    if ":" not in spec:
        raise ValueError(f"reward must be 'math' or 'package.module:function', got {spec!r}")
    module_name, fn_name = spec.split(":", 1)
    cwd = os.getcwd()
    if cwd not in sys.path and "" not in sys.path:
        # after the installed packages: a file in the working directory does not shadow one of them
        sys.path.append(cwd)
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise ValueError(f"reward {spec!r}: cannot import module {module_name!r}: {err}") from err
    fn = getattr(module, fn_name, None)
    if not callable(fn):
        raise ValueError(f"reward {spec!r}: {module_name} has no function {fn_name!r}")
    return _checked(fn, spec)


def _checked(fn, spec) -> RewardFn:
    def call(prompts, completions, answers):
        out = list(fn(prompts, completions, answers))
        if len(out) != len(completions):
            raise ValueError(f"reward {spec}: returned {len(out)} rewards for {len(completions)} completions")
        for i, r in enumerate(out):
            if isinstance(r, bool) or not isinstance(r, (int, float)) or not math.isfinite(r):
                raise ValueError(f"reward {spec}: reward {i} is {r!r}; expected a finite number")
        return [float(r) for r in out]

    return call
