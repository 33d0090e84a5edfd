"""The cluster options shared by ``geomprobe analyze`` and ``geomprobe train --sweep``.

Thin: add the flags, check them (messages name the flag as typed), and build a runner from the
library (:func:`geomprobe.distributed.cluster_runner`, :func:`geomprobe.distributed.streaming_runner`).
Imports nothing from Dask.
"""
from __future__ import annotations

from geomprobe._validation import InputError, check_positive_int
from geomprobe.distributed import INSTALL_HINT, cluster_runner, streaming_runner

__all__ = ["add_cluster_options", "check_cluster_args", "runner_from_args"]


def add_cluster_options(parser) -> None:
    """Add --scheduler, --workers, --threads-per-worker, --retries, --stream-batch-rows."""
    g = parser.add_argument_group("cluster (Dask; needs " + INSTALL_HINT + ")")
    g.add_argument("--scheduler", metavar="ADDRESS",
                   help="run the tasks on an existing Dask cluster, e.g. tcp://10.0.0.5:8786")
    g.add_argument("--workers", type=int, metavar="N",
                   help="run the tasks on a local cluster of N worker processes (bound to 127.0.0.1)")
    g.add_argument("--threads-per-worker", type=int, default=None, metavar="T",
                   help="threads of each local worker (default 1; with --workers only)")
    g.add_argument("--retries", type=int, default=2, metavar="R",
                   help="reruns of a task that crashed or whose worker died (default 2)")
    g.add_argument("--stream-batch-rows", type=int, default=None, metavar="B",
                   help="compute alignment from batches of B rows instead of loading a layer whole "
                        "(for layers larger than a worker's memory; see docs/scaling.md)")


def check_cluster_args(args) -> dict:
    """The checked cluster options of parsed arguments: scheduler, workers, threads_per_worker, retries,
    stream_batch_rows (missing attributes read as not given)."""
    scheduler = getattr(args, "scheduler", None) or None
    workers = getattr(args, "workers", None)
    tpw = getattr(args, "threads_per_worker", None)
    retries = getattr(args, "retries", 2)
    stream = getattr(args, "stream_batch_rows", None)
    if scheduler and workers is not None:
        raise InputError(f"give either --scheduler ({scheduler}) or --workers ({workers}), not both")
    if tpw is not None and workers is None:
        raise InputError(f"--threads-per-worker ({tpw}) applies to a local cluster: use it with --workers")
    if workers is not None:
        check_positive_int(workers, "--workers")
    if tpw is not None:
        check_positive_int(tpw, "--threads-per-worker")
    check_positive_int(retries, "--retries", minimum=0)
    if stream is not None:
        check_positive_int(stream, "--stream-batch-rows")
    return {"scheduler": scheduler, "workers": workers, "threads_per_worker": tpw, "retries": retries,
            "stream_batch_rows": stream}


def runner_from_args(args):
    """The runner the parsed options ask for: a cluster runner with --scheduler or --workers, a local
    streaming runner with only --stream-batch-rows, else None (the default serial runner)."""
    o = check_cluster_args(args)
    if not o["scheduler"] and o["workers"] is None:
        return streaming_runner(o["stream_batch_rows"]) if o["stream_batch_rows"] is not None else None
    return cluster_runner(scheduler=o["scheduler"], workers=o["workers"], threads_per_worker=o["threads_per_worker"] or 1,
                          retries=o["retries"], stream_batch_rows=o["stream_batch_rows"])
