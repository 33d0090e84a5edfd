"""Compile the analysis kernels into numba's disk cache ahead of their first use.

A fresh install has an empty numba cache: the first analysis in it compiles every kernel it calls
(~1 min of CPU on a 2-core machine, docs/performance.md "First call in a fresh process"). The kernels
are cached on disk (``cache=True``), so a kernel compiled by *another* process is loaded, not compiled,
by this one. :func:`start` therefore compiles them in background processes, split into jobs that
share no kernel, while the caller does something else (``geomprobe demo`` trains its network); the
caller then :func:`wait`\\ s for them before its own analysis, which loads every kernel from the cache.

Each job runs the same code path as a real analysis on a tiny seeded input of the same types
(float32 activations, int64 labels), so it compiles exactly the specialisations a real analysis
uses. With a warm cache a job only loads the kernels (about a second). A failed or killed job costs
nothing but time: the caller compiles whatever is missing itself, as it would without warm-up.

``python -m geomprobe._warmup JOB`` runs one job in this process.
"""
from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time

import numpy as np

# job -> what it compiles. "centers": the MFTMA center model; "anchors": the MFTMA without a center model
# (K = 0: the per-manifold anchor kernels), then geomprobe analyze's row path without MFTMA (alignment
# and the other families' kernels). The two run at once and compile (nearly) disjoint kernels. "final"
# runs alone after them: the whole row path with MFTMA, which loads what they compiled and compiles
# what is still missing. numba's cache index of a kernel is rewritten whole by each process that adds
# a specialisation to it, so two processes adding different specialisations at once can lose one
# (docs/performance.md, "First call in a fresh process"); the single "final" writer puts it back.
JOBS = ("centers", "anchors")
FINAL = "final"


def _tiny(seed: int = 0, P: int = 6, M: int = 8, N: int = 24):
    """A tiny seeded input of the types a real analysis sees: float32 (P*M, N), int64 labels."""
    rng = np.random.default_rng(seed)
    centers = 3.0 * rng.standard_normal((P, N))
    X = (np.repeat(centers, M, axis=0) + rng.standard_normal((P * M, N))).astype(np.float32)
    labels = np.repeat(np.arange(P, dtype=np.int64), M)
    return X, labels


def run_job(job: str) -> None:
    """Compile (or load) the kernels of one job in this process."""
    if job not in JOBS + (FINAL,):
        raise ValueError(f"warm-up job must be one of {', '.join(JOBS + (FINAL,))}, got {job!r}")
    X, labels = _tiny()
    if job == "centers":
        from .mftma.centers import fit_center_model

        centers = np.stack([X[labels == c].mean(axis=0, dtype=np.float64) for c in np.unique(labels)])
        fit_center_model(centers, np.random.default_rng(0), n_reps=2)
    elif job == "anchors":
        from .mftma.capacity import manifold_analysis

        manifold_analysis(X, labels, n_t=4, n_reps=1, seed=0, K=0, seed_mode="spawn")
        _analyze_tiny(X, labels, mftma=False)
    else:
        _analyze_tiny(X, labels, mftma=True)


def _analyze_tiny(X, labels, *, mftma: bool) -> None:
    """geomprobe analyze's row path on a tiny file of the format's keys (float32 activations)."""
    from .analysis import AnalyzeOptions, analyze
    from .io import save_activations

    with tempfile.TemporaryDirectory(prefix="geomprobe-warmup-") as tmp:
        path = os.path.join(tmp, "warmup.npz")
        n = X.shape[0]
        split = np.where(np.arange(n) % 4 == 0, "test", "train")
        permuted = (np.arange(n) % 4 == 1)
        save_activations(path, labels, {"a": X, "b": np.maximum(X, 0)}, split=split,
                         permuted=permuted, train_labels=labels)
        analyze([path], AnalyzeOptions(seed=0, n_reps=2, n_t=4, mftma=mftma), outdir=os.path.join(tmp, "out"),
                force=True)


def child_argv(statement: str) -> list[str]:
    """argv of a Python child that runs ``statement`` with this process's sys.path (whatever its
    working directory holds)."""
    return [sys.executable, "-c", f"import sys; sys.path[:] = {sys.path!r}; {statement}"]


def _spawn(job: str) -> subprocess.Popen | None:
    try:
        # the child imports geomprobe from where this process did: `python -m geomprobe._warmup` run in a
        # source checkout would put the checkout first on sys.path and compile ITS kernels (another
        # cache) when this process runs an installed copy, as `pip install . && geomprobe demo` does
        p = subprocess.Popen(child_argv(f"from geomprobe._warmup import run_job; run_job({job!r})"),
                             stdin=subprocess.DEVNULL,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                             preexec_fn=(lambda: os.nice(5)) if hasattr(os, "nice") else None)
    except OSError:
        return None  # no warm-up: the caller compiles what it needs itself
    p.geomprobe_t0 = time.perf_counter()
    return p


def start(jobs=JOBS) -> list[subprocess.Popen]:
    """Start one background process per job (stdout/stderr discarded, lowest priority)."""
    return [p for p in map(_spawn, jobs) if p is not None]


def wait(procs: list[subprocess.Popen], timeout: float = 600.0, *, warm_after: float = 10.0) -> float:
    """Wait for the warm-up processes (at most ``timeout`` s in all, then kill them); then, when one of
    them ran longer than ``warm_after`` s (it compiled: with a warm cache a job takes 2-3 s), run the
    "final" job alone. Returns the seconds waited."""
    t0 = time.perf_counter()
    compiled = False
    for p in procs:
        left = max(0.0, timeout - (time.perf_counter() - t0))
        try:
            p.wait(left)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
        compiled |= time.perf_counter() - getattr(p, "geomprobe_t0", t0) > warm_after
    if compiled:
        final = _spawn(FINAL)
        if final is not None:
            try:
                final.wait(max(1.0, timeout - (time.perf_counter() - t0)))
            except subprocess.TimeoutExpired:
                final.kill()
                final.wait()
    return time.perf_counter() - t0


def stop(procs: list[subprocess.Popen]) -> None:
    """Kill the warm-up processes that still run (on an error or Ctrl-C of the caller)."""
    for p in procs:
        if p.poll() is None:
            p.kill()
            p.wait()


if __name__ == "__main__":
    run_job(sys.argv[1] if len(sys.argv) > 1 else "centers")
