"""Run geomprobe's (file, layer, subset) analysis tasks on a Dask cluster (docs/scaling.md).

The numbers do not depend on where or in which order tasks run: every task opens its own file, reads
only its own layer, and takes its random seed from :func:`geomprobe.analysis.task_seed` (the user's
seed and the task's key). The runner returned by :func:`dask_runner` follows the runner protocol of
:func:`geomprobe.analysis.analyze`: it calls ``on_done(TaskResult)`` here, in the client process, as
each task finishes, so results are written (atomically, by ``analyze``) while the others still run.

Failures:

- a task whose input or analysis is wrong (InputError, AnalysisError) is reported with its key and
  error, exactly as the local run reports it, and the other tasks go on;
- any other exception (an I/O hiccup, MemoryError, a bug) is retried ``retries`` times, then reported
  the same way;
- a worker that dies mid-task has its task rerun elsewhere by the scheduler, up to the scheduler's
  ``distributed.scheduler.allowed-failures`` (set to ``retries`` for clusters started here), then the
  task is reported as failed (KilledWorker).

Dask is imported only inside functions: ``import geomprobe`` and a local ``geomprobe analyze`` never
import it.
"""
from __future__ import annotations

import contextlib
import os
import uuid
from dataclasses import replace
from typing import Any, Callable, Iterator

import numpy as np

from ._validation import AnalysisError, InputError, check_positive_int
from .alignment import AlignmentAccumulator
from .analysis import (
    AnalyzeOptions,
    Task,
    TaskResult,
    _row,
    alignment_rows_from_stats,
    analyze,
    run_task,
    shared_file,
)

__all__ = [
    "dask_runner",
    "cluster_runner",
    "connect",
    "local_cluster",
    "analyze_on_cluster",
    "run_task_streamed",
    "streaming_runner",
    "DEFAULT_STREAM_BATCH_ROWS",
]

INSTALL_HINT = "pip install 'geomprobe[dask]'"
DEFAULT_STREAM_BATCH_ROWS = 8192
_CONNECT_TIMEOUT_S = 30


def _import_distributed():
    """``distributed``, or an InputError that says how to install it."""
    try:
        import distributed
    except ImportError as exc:
        raise InputError(
            f"running on a Dask cluster needs dask.distributed, which is not installed ({exc}); "
            f"install it with: {INSTALL_HINT}"
        ) from None
    return distributed


# -- what runs on a worker ------------------------------------------------------------------------
def _worker_run(task: Task, options: AnalyzeOptions, stream_batch_rows: int | None, task_fn, base_dir: str):
    """Run one task on a worker. User-input and analysis errors become the result's error (they
    would fail again); anything else propagates so that Dask retries it (``retries``)."""
    local = task
    if base_dir and not os.path.isabs(task.file):  # a relative path means the client's directory
        local = replace(task, file=os.path.join(base_dir, task.file))
    try:
        if task_fn is not None:
            res = task_fn(local, options)
        elif stream_batch_rows is not None:
            res = run_task_streamed(local, options, stream_batch_rows)
        else:
            res = run_task(local, options)
    except (InputError, AnalysisError) as exc:
        return TaskResult(task, error=f"{type(exc).__name__}: {exc}")
    if local is not task:
        res.task = task
        for r in res.rows:
            if r["file"] == local.file:
                r["file"] = task.file
    return res


# -- the runner ----------------------------------------------------------------------------------
def dask_runner(client, retries: int = 2, *, stream_batch_rows: int | None = None,
                task_fn: Callable[[Task, AnalyzeOptions], TaskResult] | None = None,
                timeout_s: float | None = None):
    """A runner for :func:`geomprobe.analysis.analyze` that runs every task on ``client``'s cluster.

    ``retries``: reruns of a task that raised an unexpected exception. ``stream_batch_rows``: compute
    alignment by streaming row batches (:func:`run_task_streamed`). ``task_fn(task, options)``
    replaces :func:`geomprobe.analysis.run_task` (tests and custom analyses; it must be picklable).
    Results come back through ``on_done`` in this process in completion order; if the caller stops
    (an exception or Ctrl-C in ``on_done``), the tasks not yet finished are cancelled.
    ``timeout_s``: a deadline for the whole run; tasks without a result by then are cancelled and
    reported as failed (TimeoutError).
    """
    retries = check_positive_int(retries, "retries", minimum=0)
    if stream_batch_rows is not None:
        stream_batch_rows = check_positive_int(stream_batch_rows, "stream_batch_rows")
    if timeout_s is not None and not (isinstance(timeout_s, (int, float)) and timeout_s > 0):
        raise InputError(f"timeout_s must be a number > 0, got {timeout_s!r}")

    def runner(tasks, options, on_done) -> None:
        if not tasks:
            return
        distributed = _import_distributed()
        run_id = uuid.uuid4().hex[:8]
        base_dir = os.getcwd()
        futures = {}
        try:
            for t in tasks:
                fut = client.submit(
                    _worker_run, t, options, stream_batch_rows, task_fn, base_dir,
                    key=f"geomprobe_task-{t.digest}-{run_id}", retries=retries, pure=False,
                )
                futures[fut.key] = (fut, t)
            try:
                for fut in distributed.as_completed([f for f, _ in futures.values()], timeout=timeout_s):
                    _, t = futures.pop(fut.key)
                    try:
                        res = fut.result()
                    except Exception as exc:  # noqa: BLE001 - retries exhausted or worker lost: report
                        res = TaskResult(t, error=f"{type(exc).__name__}: {exc}")
                    fut.release()
                    on_done(res)
            except TimeoutError:
                late = [t for _, t in futures.values()]
                with contextlib.suppress(Exception):
                    client.cancel([f for f, _ in futures.values()])
                futures.clear()
                for t in late:
                    on_done(TaskResult(t, error=f"TimeoutError: no result within {timeout_s} s (cancelled)"))
        finally:
            if futures:
                with contextlib.suppress(Exception):
                    client.cancel([f for f, _ in futures.values()])

    return runner


# -- clusters ------------------------------------------------------------------------------------
def local_cluster(n_workers: int, threads_per_worker: int = 1, *, retries: int = 2,
                  gpus: list[str] | None = None, memory_limit: str | int | None = "auto"):
    """A local Dask cluster of worker *processes* bound to 127.0.0.1 (no dashboard).

    Each worker's numba uses ``threads_per_worker`` threads (``NUMBA_NUM_THREADS``), so workers do not
    oversubscribe the cores. ``gpus``: one device id per worker; worker i then sees only GPU
    ``gpus[i]`` (``CUDA_VISIBLE_DEVICES``) and offers the Dask resource ``GPU=1``. A task whose
    worker dies is rerun up to ``retries`` times (``distributed.scheduler.allowed-failures``).
    """
    _import_distributed()
    from distributed import LocalCluster, Nanny, Scheduler, SpecCluster

    n = check_positive_int(n_workers, "workers")
    tpw = check_positive_int(threads_per_worker, "threads_per_worker")
    retries = check_positive_int(retries, "retries", minimum=0)
    env = {"NUMBA_NUM_THREADS": str(tpw), "OMP_NUM_THREADS": str(tpw)}
    # no dashboard; the scheduler's small HTTP server (health, metrics) on a free loopback port
    sched = {"dashboard": False, "dashboard_address": "127.0.0.1:0", "allowed_failures": retries}
    if not gpus:
        return LocalCluster(n_workers=n, threads_per_worker=tpw, processes=True, host="127.0.0.1",
                            dashboard_address=None, memory_limit=memory_limit, env=env, scheduler_kwargs=sched)
    if len(gpus) != n:
        raise InputError(f"gpus lists {len(gpus)} device(s) but workers is {n}: give one device per worker")
    workers = {
        f"gpu-{g}": {"cls": Nanny, "options": {
            "nthreads": tpw, "host": "127.0.0.1", "resources": {"GPU": 1}, "memory_limit": memory_limit,
            "env": {**env, "CUDA_VISIBLE_DEVICES": str(g)}}}
        for g in gpus
    }
    scheduler = {"cls": Scheduler, "options": {"host": "127.0.0.1", **sched}}
    return SpecCluster(workers=workers, scheduler=scheduler)


@contextlib.contextmanager
def connect(*, scheduler: str | None = None, workers: int | None = None, threads_per_worker: int = 1,
            retries: int = 2, gpus: list[str] | None = None) -> Iterator[Any]:
    """A Client to an existing scheduler (``scheduler='tcp://HOST:PORT'``) or to a new local cluster
    of ``workers`` processes; closed (with the local cluster) when the block ends."""
    distributed = _import_distributed()
    if (scheduler is None) == (workers is None):
        raise InputError("give either a scheduler address (--scheduler tcp://HOST:PORT) or a number of local "
                         "workers (--workers N), not both and not neither")
    if scheduler is not None:
        if not isinstance(scheduler, str) or not scheduler.strip():
            raise InputError(f"scheduler must be an address like tcp://HOST:PORT, got {scheduler!r}")
        try:
            client = distributed.Client(scheduler, timeout=_CONNECT_TIMEOUT_S)
        except (OSError, TimeoutError, ValueError) as exc:
            raise InputError(f"could not connect to the Dask scheduler at {scheduler} within "
                             f"{_CONNECT_TIMEOUT_S} s ({type(exc).__name__}: {exc})") from None
        try:
            yield client
        finally:
            client.close()
        return
    cluster = local_cluster(workers, threads_per_worker, retries=retries, gpus=gpus)
    try:
        client = distributed.Client(cluster)
        try:
            yield client
        finally:
            client.close()
    finally:
        cluster.close()


def cluster_runner(*, scheduler: str | None = None, workers: int | None = None, threads_per_worker: int = 1,
                   retries: int = 2, stream_batch_rows: int | None = None, task_fn=None):
    """A runner that connects (or starts a local cluster) when called, runs the tasks, and closes.
    Nothing starts when there is nothing to run (e.g. ``--resume`` with every task done)."""
    if (scheduler is None) == (workers is None):
        raise InputError("give either a scheduler address (--scheduler tcp://HOST:PORT) or a number of local "
                         "workers (--workers N), not both and not neither")
    if workers is not None:
        check_positive_int(workers, "workers")
    check_positive_int(threads_per_worker, "threads_per_worker")
    check_positive_int(retries, "retries", minimum=0)
    if stream_batch_rows is not None:
        check_positive_int(stream_batch_rows, "stream_batch_rows")
    _import_distributed()  # fail before any work, with the install hint

    def runner(tasks, options, on_done) -> None:
        if not tasks:
            return
        with connect(scheduler=scheduler, workers=workers, threads_per_worker=threads_per_worker,
                     retries=retries) as client:
            dask_runner(client, retries, stream_batch_rows=stream_batch_rows, task_fn=task_fn)(
                tasks, options, on_done)

    return runner


def analyze_on_cluster(files, options: AnalyzeOptions | None = None, *, scheduler: str | None = None,
                       workers: int | None = None, threads_per_worker: int = 1, retries: int = 2,
                       stream_batch_rows: int | None = None, **analyze_kwargs):
    """:func:`geomprobe.analysis.analyze` on a cluster: an existing one (``scheduler``) or ``workers``
    local processes started for this call. Other keywords (outdir, resume, force, progress) go to
    ``analyze``. The report equals the local run's."""
    runner = cluster_runner(scheduler=scheduler, workers=workers, threads_per_worker=threads_per_worker,
                            retries=retries, stream_batch_rows=stream_batch_rows)
    return analyze(files, options, runner=runner, **analyze_kwargs)


# -- streaming alignment -------------------------------------------------------------------------
def run_task_streamed(task: Task, options: AnalyzeOptions, batch_rows: int = DEFAULT_STREAM_BATCH_ROWS) -> TaskResult:
    """:func:`geomprobe.analysis.run_task`, with the alignment measures computed from row batches
    (:meth:`geomprobe.io.ActivationFile.iter_rows` into an :class:`AlignmentAccumulator`), so a
    layer's memory is O(batch_rows x features + classes x features) instead of the whole layer.

    Same rows in the same order as ``run_task``; values equal to float64 rounding (bit for bit when
    one batch holds the whole subset), and identical wherever the same ``batch_rows`` is used.
    MFTMA (activations) and the all-pairs measures (gradients) still load the subset: turn them off
    (``mftma=False`` / ``pairwise=False``) for layers larger than memory. Probe tasks run unchanged.
    """
    bs = check_positive_int(batch_rows, "batch_rows")
    if task.kind == "probe" or not options.alignment:
        return run_task(task, options)
    res = TaskResult(task)
    f = shared_file(task.file)
    # the file stays open for the other tasks of this process (analysis.shared_file)
    sub = f.subsets()[task.subset]
    key = f"act/{task.layer}" if task.kind == "act" else f"grad/{task.layer}"
    if key not in f.keys():
        raise InputError(f"{task.file}: no key '{key}'")
    acc = AlignmentAccumulator()
    n_bad, first_bad, n_ok = 0, None, 0
    for pos, block in f.iter_rows(key, sub.rows, batch_rows=bs):
        labels = sub.labels[pos]
        if block.dtype.kind == "f":
            finite = np.isfinite(block).all(axis=1)
            if not finite.all():
                bad = pos[~finite]
                n_bad += bad.size
                first_bad = int(bad.min()) if first_bad is None else min(first_bad, int(bad.min()))
                block, labels = block[finite], labels[finite]
        if block.shape[0] and not (n_bad and not options.drop_nonfinite):
            acc.update(block, labels)
        n_ok += block.shape[0]
    if n_bad:
        if not options.drop_nonfinite:  # the message run_task gives (analysis._finite_rows)
            raise InputError(
                f"{task.file}: layer '{task.layer}' subset {task.subset}: {n_bad} row(s) hold NaN or Inf; "
                f"first at subset row {first_bad} (use --drop-nonfinite to exclude them)"
            )
        res.note("nonfinite_dropped", f"dropped {n_bad} row(s) holding NaN or Inf")
        res.rows.append(_row(task, "n_dropped_nonfinite", None, n_bad))
    if n_ok == 0:
        raise InputError(f"{task.file}: layer '{task.layer}' subset {task.subset}: no examples left")
    res.rows.append(_row(task, "n_examples", None, n_ok))
    alignment_rows_from_stats(acc.compute(), task, "rep_" if task.kind == "act" else "grad_", res)
    if (task.kind == "act" and options.mftma) or (task.kind == "grad" and options.pairwise):
        rest = run_task(task, replace(options, alignment=False))  # loads the subset: not streamed
        lead = {"n_examples", "n_dropped_nonfinite"}
        res.rows.extend(r for r in rest.rows if not (r["metric"] in lead and r["class"] == ""))
        res.notes.extend(n for n in rest.notes if n.code != "nonfinite_dropped")
    return res


def streaming_runner(batch_rows: int = DEFAULT_STREAM_BATCH_ROWS):
    """A serial runner (this process) that uses :func:`run_task_streamed`; failures are reported per
    task like :func:`geomprobe.analysis.serial_runner`."""
    bs = check_positive_int(batch_rows, "stream_batch_rows")

    def runner(tasks, options, on_done) -> None:
        for t in tasks:
            try:
                res = run_task_streamed(t, options, bs)
            except Exception as exc:  # noqa: BLE001 - reported per task, the others go on
                res = TaskResult(t, error=f"{type(exc).__name__}: {exc}")
            on_done(res)

    return runner
