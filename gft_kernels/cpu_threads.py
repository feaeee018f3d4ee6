"""Helper threads for work the CPU engine splits by hand between its intra-op threads.

The chunked engine's per-chunk work is a few matrix products and about ten passes over a
``[C x V]`` buffer. Left to torch's intra-op parallelism, every one of those ops splits across
the threads and ends at a barrier: on a machine whose cores are shared with other work, each
barrier waits for the thread that was descheduled, about a time slice per op. Splitting the
vocabulary between threads instead, each thread running its columns' ops at one intra-op
thread, leaves one synchronisation per chunk.

``HelperThreads(k)`` holds ``k`` persistent threads, each set to one intra-op thread; ``run``
gives each a job, runs the first job on the calling thread and returns every result in order
(the first exception, after every job has finished). The caller runs inside
``intra_op_threads(1)``, which restores torch's thread count on exit (``torch.set_num_threads``
also sets the default that new threads start with, so the helpers' own setting is undone there).
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import os
import queue
import threading
from collections.abc import Callable

import torch

_POOLS: dict[int, HelperThreads] = {}
# Decided once, at import: with OpenMP, torch.set_num_threads sets the calling thread's count
# (and the default new threads start with); torch's native thread pool refuses a second call.
SUPPORTED = "parallel backend: OpenMP" in torch.__config__.parallel_info()


@contextlib.contextmanager
def intra_op_threads(count: int):
    before = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


class HelperThreads:
    def __init__(self, count: int):
        self._queues: list[queue.SimpleQueue] = []
        ready = threading.Barrier(count + 1)
        for _ in range(count):
            jobs: queue.SimpleQueue = queue.SimpleQueue()
            threading.Thread(target=self._serve, args=(jobs, ready), daemon=True, name="gft-cpu-helper").start()
            self._queues.append(jobs)
        ready.wait()

    @staticmethod
    def _serve(jobs: queue.SimpleQueue, ready: threading.Barrier) -> None:
        torch.set_num_threads(1)
        ready.wait()
        while True:
            job, done = jobs.get()
            try:
                with torch.no_grad():
                    result = job()
            except BaseException as err:  # handed to the caller, which raises it
                result, error = None, err
            else:
                error = None
            # hold nothing of a finished job while waiting for the next one: its buffers are the
            # caller's to free, and a gradient still referenced here would be copied by autograd
            job = None
            if error is None:
                done.set_result(result)
            else:
                done.set_exception(error)
            result = error = done = None

    def run(self, jobs: list[Callable]) -> list:
        """Results of ``jobs`` (one more than the helpers), the first run here."""
        futures = []
        for jobs_queue, job in zip(self._queues, jobs[1:]):
            done: concurrent.futures.Future = concurrent.futures.Future()
            jobs_queue.put((job, done))
            futures.append(done)
        try:
            first = jobs[0]()
        finally:
            concurrent.futures.wait(futures)  # no helper still writes shared buffers
        return [first] + [f.result() for f in futures]


def helper_threads(count: int) -> HelperThreads:
    """The process's ``count`` helper threads (started on first use)."""
    if count not in _POOLS:
        _POOLS[count] = HelperThreads(count)
    return _POOLS[count]


# a forked child has none of its parent's threads
os.register_at_fork(after_in_child=_POOLS.clear)
