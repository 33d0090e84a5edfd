"""MFTMA benchmarks: prints a table (see docs/performance.md, section MFTMA).

    python bench/bench_mftma.py            # everything (scale case needs ~3 GB of RAM)
    python bench/bench_mftma.py --quick    # skip the N = 65,536 scale case

Rows: whole manifold_analysis at P=100, M=50, N=2048 (n_t=200, n_reps=10) after JIT warm-up and its
stages; per Gaussian sample fast solver vs the cvxpy path on the same manifolds; empirical_capacity on
case b (P=50, M=50, N=500, n_rep=30); the scale case P=100, M=50, N=65,536 float32 (time and peak
memory relative to the input size).
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time
import tracemalloc
from pathlib import Path

import numpy as np

from geomprobe.mftma import empirical_capacity, manifold_analysis
from geomprobe.mftma.anchors import cvxpy_anchors, nnls_max_iter
from geomprobe.mftma.capacity import _prepare_one
from geomprobe.mftma.centers import fit_center_model
from geomprobe._kernels.mftma_anchors import manifold_metrics

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT / ".." / "shared" / "reference" / "mftma"


def gauss(P, M, N, seed=0, dtype=np.float64):
    rng = np.random.default_rng(seed)
    X = np.empty((P * M, N), dtype=dtype)
    for i in range(P):
        c = rng.standard_normal(N) / np.sqrt(N)
        X[i * M:(i + 1) * M] = c + rng.standard_normal((M, N)) / np.sqrt(N)
    return X, np.repeat(np.arange(P), M)


def timeit(f, repeat=3):
    out = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        r = f()
        out.append(time.perf_counter() - t0)
    return float(np.median(out)), r


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="skip the N = 65,536 scale case")
    args = ap.parse_args(argv)
    rows = []
    print(f"# threads available: {len(os.sched_getaffinity(0))}", flush=True)

    # 1. P=100 x M=50 x N=2048
    X, y = gauss(100, 50, 2048)
    manifold_analysis(X[:500], y[:500], seed=0, n_t=20)          # JIT warm-up
    t, r = timeit(lambda: manifold_analysis(X, y, seed=0))
    rows.append(("manifold_analysis P=100 M=50 N=2048 (n_t=200, n_reps=10)", f"{t:.3f} s",
                 f"budget 0.5 s; reference 33-57 s -> x{45 / t:.0f}; K={r.K}, QPs={r.n_qp}"))
    C = np.stack([X[y == i].mean(0) for i in range(100)])
    tc, cm = timeit(lambda: fit_center_model(C, np.random.default_rng(0), n_threads=len(os.sched_getaffinity(0))))
    rows.append(("  stage: center model (maxK, n_reps=10 restarts)", f"{tc:.3f} s",
                 f"{cm.n_fits} fits, {cm.cg_iterations} optimiser iterations"))
    xbar = X.mean(0)
    tp, sd = timeit(lambda: [_prepare_one(X[y == i], C[i], xbar, cm.V11) for i in range(100)], repeat=1)
    rows.append(("  stage: per-manifold preparation (1 thread)", f"{tp:.3f} s", "projection, centering, Gram + Cholesky R"))
    Ts = [np.random.default_rng(i).standard_normal((s.shape[0], 200)) for i, s in enumerate(sd)]
    ta, _ = timeit(lambda: [manifold_metrics(sd[i], Ts[i], 0.0, nnls_max_iter(50)) for i in range(100)])
    rows.append(("  stage: anchors, 20,000 samples (1 thread)", f"{ta:.3f} s", f"{ta / 20000 * 1e6:.1f} us/sample"))

    # 2. per sample: fast vs cvxpy on the same manifolds
    n_cv = 0
    t_cv = 0.0
    for i in range(2):
        T = Ts[i][:, :100]
        t0 = time.perf_counter()
        _, is_qp = cvxpy_anchors(sd[i], T, 0.0)
        t_cv += time.perf_counter() - t0
        n_cv += T.shape[1]
    t_fast, _ = timeit(lambda: [manifold_metrics(sd[i], Ts[i][:, :100], 0.0, nnls_max_iter(50)) for i in range(2)], 5)
    per_cv = t_cv / n_cv
    per_fast = t_fast / n_cv
    rows.append(("per Gaussian sample: cvxpy (Clarabel) path", f"{per_cv * 1e3:.2f} ms", "same manifolds and t"))
    rows.append(("per Gaussian sample: fast active-set NNLS", f"{per_fast * 1e6:.1f} us",
                 f"x{per_cv / per_fast:.0f} faster (target >= 100)"))

    # 3. empirical capacity on case b
    path = SHARED / "inputs" / "b_gauss_P50_M50_N500.npz"
    if path.exists():
        d = np.load(path)
        Xs = [d[f"X_{i:03d}"].astype(np.float64).T for i in range(50)]
        src = "reference case b"
    else:
        Xb, yb = gauss(50, 50, 500, seed=1)
        Xs = [Xb[yb == i] for i in range(50)]
        src = "generated (case b not present)"
    empirical_capacity(Xs[:10], seed=0, n_rep=2)
    t0 = time.perf_counter()
    e = empirical_capacity(Xs, seed=0)
    te = time.perf_counter() - t0
    rows.append(("empirical_capacity P=50 M=50 N=500 n_rep=30", f"{te:.2f} s",
                 f"{src}; alpha_sim={e.capacity:.4f}, {e.n_tests} exact tests; budget 5 s, reference 60-120 s"))

    # 4. scale: P=100, M=50, N=65,536 float32
    if not args.quick:
        Xl, yl = gauss(100, 50, 65536, seed=2, dtype=np.float32)
        ysorted = yl
        in_bytes = Xl.nbytes
        rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        tracemalloc.start()
        t0 = time.perf_counter()
        rl = manifold_analysis(Xl, ysorted, seed=0)
        tl = time.perf_counter() - t0
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        rss1 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        rows.append(("scale P=100 M=50 N=65,536 float32", f"{tl:.2f} s",
                     f"input {in_bytes / 2**30:.2f} GiB; extra peak (tracemalloc) {peak / 2**30:.2f} GiB = "
                     f"{peak / in_bytes:.2f}x input; process max RSS {rss1 / 2**30:.2f} GiB "
                     f"({rss1 / in_bytes:.2f}x input); capacity {rl.capacity:.4f}"))

    w = max(len(r[0]) for r in rows)
    print(f"| {'measurement'.ljust(w)} | value | notes |")
    print(f"|{'-' * (w + 2)}|---|---|")
    for a, b, c in rows:
        print(f"| {a.ljust(w)} | {b} | {c} |")


if __name__ == "__main__":
    sys.exit(main())
