"""Dask benchmark: 64 (file x layer x subset) analysis tasks on a 2-worker local cluster vs serially.

The tasks are MFTMA tasks when geomprobe.mftma.rows exists, else alignment tasks (the table says
which). Measured side by side in one run, after warming both sides up (numba compiles its parallel
kernels once per process, so every fresh worker pays that once; it is reported separately):

* serial: geomprobe.analysis.analyze in this process (numba and MFTMA's thread pools use every core);
* serial, 1 core: the same in a child process pinned to one core with NUMBA_NUM_THREADS=1 (the
  baseline of one worker's share: the scaling efficiency is its time / (workers x dask time));
* dask: the same call with geomprobe.distributed.dask_runner on a LocalCluster of 2 worker processes
  x 1 thread (numba 1 thread each);
* overhead per task: 64 tasks that do nothing (task_fn returns an empty result) through the cluster,
  i.e. submit + schedule + pickle + result + on_done.

Run:  python bench/bench_distributed.py [--small] [--workers 2]
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import tempfile
import time

import numpy as np


def _noop(task, options):
    from geomprobe.analysis import TaskResult

    return TaskResult(task)


def make_files(d, n_files, n_layers, n, dim, seed=0, prefix="epoch"):
    from geomprobe.io import save_activations

    rng = np.random.default_rng(seed)
    files = []
    K = 10
    for i in range(n_files):
        labels = np.repeat(np.arange(K), n // K)
        m = labels.size
        split = np.where(np.arange(m) % 5 == 0, "test", "train")
        permuted = (np.arange(m) % 3 == 0) & (split == "train")
        train_labels = labels.copy()
        train_labels[permuted] = rng.permutation(labels[permuted])
        mu = rng.standard_normal((K, dim)).astype(np.float32)
        acts = {f"layer{l + 1}": (mu[labels] * (0.5 + l) + rng.standard_normal((m, dim), dtype=np.float32))
                for l in range(n_layers)}
        files.append(str(save_activations(os.path.join(d, f"{prefix}{i}.npz"), labels, acts, split=split,
                                          permuted=permuted, train_labels=train_labels)))
    return files


def _child_serial(argv):
    """Run in a child process pinned to one core: warm up, then time analyze(files)."""
    os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})
    from geomprobe.analysis import AnalyzeOptions, analyze

    has_mftma = importlib.util.find_spec("geomprobe.mftma.rows") is not None
    opts = AnalyzeOptions(mftma=has_mftma, probes=False)
    warm, files = argv[0], argv[1:]
    analyze([warm], opts)
    t = time.perf_counter()
    analyze(files, opts)
    print(f"{time.perf_counter() - t:.6f}")


def timed(fn):
    t = time.perf_counter()
    out = fn()
    return time.perf_counter() - t, out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--small", action="store_true", help="quick run with small layers")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--child-serial", nargs="+", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child_serial:
        return _child_serial(a.child_serial)

    import subprocess
    import sys

    import distributed

    from geomprobe.analysis import AnalyzeOptions, analyze, plan_tasks
    from geomprobe.distributed import dask_runner, local_cluster

    has_mftma = importlib.util.find_spec("geomprobe.mftma.rows") is not None
    kind = "MFTMA (+ alignment)" if has_mftma else "alignment (geomprobe.mftma.rows not available)"
    opts = AnalyzeOptions(mftma=has_mftma, probes=False)
    n, dim = (1000, 256) if a.small else (2000, 1024)
    with tempfile.TemporaryDirectory() as d:
        files = make_files(d, n_files=4, n_layers=4, n=n, dim=dim)  # 4 files x 4 layers x 4 subsets = 64
        warm = make_files(d, 1, 1, 100, 8, seed=1, prefix="warm")  # tiny file, for numba warm-up
        n_tasks = len(plan_tasks(files, opts))
        analyze(warm, opts)  # compile numba here
        t_serial, serial = timed(lambda: analyze(files, opts))
        env = dict(os.environ, NUMBA_NUM_THREADS="1", OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1",
                   MKL_NUM_THREADS="1")
        child = subprocess.run([sys.executable, __file__, "--child-serial", warm[0], *files], env=env,
                               capture_output=True, text=True, check=True)
        t_serial1 = float(child.stdout.strip().splitlines()[-1])

        t_start, cluster = timed(lambda: local_cluster(a.workers, 1))
        client = distributed.Client(cluster)
        try:
            t_warm, _ = timed(lambda: analyze(warm, opts, runner=dask_runner(client)))
            t_dask, dist = timed(lambda: analyze(files, opts, runner=dask_runner(client)))
            t_dask2, _ = timed(lambda: analyze(files, opts, runner=dask_runner(client)))
            t_dask = min(t_dask, t_dask2)
            noop = [plan_tasks(files, opts)[i % n_tasks] for i in range(64)]
            got = []
            t_noop, _ = timed(lambda: dask_runner(client, task_fn=_noop)(noop, opts, got.append))
            t_noop2, _ = timed(lambda: dask_runner(client, task_fn=_noop)(noop, opts, got.append))
            t_noop = min(t_noop, t_noop2)
        finally:
            client.close()
            cluster.close()
    same = serial.rows == dist.rows and not serial.errors and not dist.errors
    rows = [
        ("tasks", f"{n_tasks} ({kind})"),
        ("task input", f"4 files x 4 layers x 4 subsets; layer {n} x {dim} float32 ({n * dim * 4 / 2**20:.0f} MiB)"),
        ("serial (this process, all cores)", f"{t_serial:.2f} s  ({t_serial / n_tasks * 1e3:.0f} ms/task)"),
        ("serial, 1 core, 1 thread", f"{t_serial1:.2f} s  ({t_serial1 / n_tasks * 1e3:.0f} ms/task)"),
        (f"dask, {a.workers} workers x 1 thread", f"{t_dask:.2f} s  ({t_dask / n_tasks * 1e3:.0f} ms/task)"),
        ("speedup serial (all cores) / dask", f"{t_serial / t_dask:.2f}x"),
        (f"scaling efficiency 1-core / ({a.workers} x dask)", f"{t_serial1 / (a.workers * t_dask):.0%}"),
        ("overhead per task (64 no-op tasks)", f"{t_noop / 64 * 1e3:.1f} ms"),
        ("cluster start (one-off)", f"{t_start:.1f} s"),
        ("worker warm-up: numba JIT (one-off per worker process)", f"{t_warm:.1f} s"),
        ("rows identical to serial", str(same)),
    ]
    w = max(len(k) for k, _ in rows)
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    print(f"bench_distributed ({'small' if a.small else 'full'}; {os.cpu_count()} cores; load average {load})")
    for k, v in rows:
        print(f"  {k.ljust(w)}  {v}")


if __name__ == "__main__":
    main()
