"""Run the tasks of :func:`geomprobe.analysis.analyze` in local worker processes.

``analyze(files, options, runner=process_runner(2))`` (``geomprobe analyze --jobs 2``) runs one task
(file x layer x subset) per worker process at a time. The numbers do not depend on the runner: every
task draws its randomness from its own key (docs/reliability.md), and ``analyze`` assembles the rows
in task order whatever order the tasks finish in. Workers are started with the "spawn" method (no
fork of a process that may hold torch or BLAS threads) and limited to one BLAS/OpenMP thread each, so
``jobs`` workers use about ``jobs`` cores; they load the numba kernels from the disk cache.
"""
from __future__ import annotations

import contextlib
import multiprocessing
import os
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait

from ._validation import InputError

_ONE_THREAD = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "NUMBA_NUM_THREADS")


def available_cores() -> int:
    """Cores this process may run on."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover
        return max(1, os.cpu_count() or 1)


@contextlib.contextmanager
def _one_thread_env():
    old = {k: os.environ.get(k) for k in _ONE_THREAD}
    os.environ.update({k: "1" for k in _ONE_THREAD})
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def process_runner(jobs: int):
    """A runner for :func:`geomprobe.analysis.analyze` with ``jobs`` worker processes (1 = serially in
    this process)."""
    if isinstance(jobs, bool) or not isinstance(jobs, int) or jobs < 1:
        raise InputError(f"jobs must be an integer >= 1, got {jobs!r}")

    def runner(tasks, options, on_done) -> None:
        from .analysis import run_task_safe, serial_runner

        tasks = list(tasks)
        if jobs == 1 or len(tasks) <= 1:
            serial_runner(tasks, options, on_done)
            return
        ctx = multiprocessing.get_context("spawn")
        with _one_thread_env(), ProcessPoolExecutor(max_workers=min(jobs, len(tasks)), mp_context=ctx) as ex:
            pending = {ex.submit(run_task_safe, t, options) for t in tasks}
            try:
                while pending:
                    finished, pending = wait(pending, return_when=FIRST_COMPLETED)
                    for f in finished:
                        on_done(f.result())
            except BaseException:
                for f in pending:
                    f.cancel()
                raise

    return runner
