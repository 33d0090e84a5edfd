"""GLUE benchmarks: prints tables (see docs/performance.md, section GLUE).

    python bench/bench_glue.py               # per-sample ratio, whole analysis, growth with P, M, N
    python bench/bench_glue.py --quick       # per-sample ratio and whole analysis only
    python bench/bench_glue.py --whole-only  # whole analysis only (about 10 s on 2 idle cores)

1. Per sample, P=50, M=50, N=500 (random dichotomies): the fast path (column-generation NNLS in
   numba, Gram formed once) vs the cvxpy path (the joint QP through Clarabel) on the same t and y
   draws; both times are per sample of the dual solve (cvxpy on --cvxpy-samples samples).
2. Whole glue_analysis at P=100, M=50, N=2048, n_t=200 (no projection of the features), after JIT
   warm-up, and its stages (Gram X X^T, dual solves, measures).
3. Growth: the whole analysis at n_t=50 while one of P, M, N varies (the others at 50, 50, 512).
"""
from __future__ import annotations

import argparse
import os
import time

import numpy as np

from geomprobe import glue_analysis
from geomprobe.glue import _block, _cvxpy_dual, _solve_fast
from geomprobe.mftma.simcap import draw_dichotomy


def gauss(P, M, N, seed=0):
    rng = np.random.default_rng(seed)
    C = rng.standard_normal((P, N)) / np.sqrt(N)
    X = np.concatenate([C[i] + rng.standard_normal((M, N)) / np.sqrt(N) for i in range(P)])
    return X - X.mean(axis=0), np.repeat(np.arange(P), M)


def draws(X, P, pc, n_t, seed=1):
    g = np.random.default_rng(seed)
    T = g.standard_normal((n_t, X.shape[1]))
    Y = np.array([draw_dichotomy("random", P, g) for _ in range(n_t)])
    SGN = np.ascontiguousarray(Y[:, pc])
    return T, SGN, np.ascontiguousarray(-SGN * (X @ T.T).T)


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="skip the growth table")
    ap.add_argument("--cvxpy-samples", type=int, default=3)
    ap.add_argument("--whole-only", action="store_true", help="only the whole-analysis table (issue 18's 10 s target)")
    args = ap.parse_args(argv)
    print(f"# threads available: {len(os.sched_getaffinity(0))}; load average {os.getloadavg()[0]:.1f}",
          flush=True)
    glue_analysis(*gauss(5, 4, 10), n_t=4, seed=0)               # JIT warm-up (cached compile)

    if not args.whole_only:
        per_sample(args)
    whole()
    if args.quick or args.whole_only:
        return
    growth()


def per_sample(args):
    # 1. per sample, fast vs cvxpy on the same draws
    P, M, N = 50, 50, 500
    X, y = gauss(P, M, N)
    T, SGN, B = draws(X, P, y, 40)
    K = X @ X.T
    LAM = np.zeros_like(B)
    t0 = time.perf_counter()
    STAT, RES = _solve_fast(K, X, True, SGN, B, LAM, block=_block(P))
    t_fast = (time.perf_counter() - t0) / B.shape[0]
    ns = args.cvxpy_samples
    t0 = time.perf_counter()
    lam_c = [_cvxpy_dual(X, SGN[s], T[s], 0.0, s) for s in range(ns)]
    t_cvx = (time.perf_counter() - t0) / ns
    dv = max(np.linalg.norm((SGN[s] * (LAM[s] - lam_c[s])) @ X) / np.linalg.norm((SGN[s] * LAM[s]) @ X)
             for s in range(ns))
    print("\n## per sample (P=50, M=50, N=500, random dichotomies)")
    print(f"{'path':<28}{'s/sample':>12}{'ratio':>10}")
    print(f"{'cvxpy (Clarabel, 1e-12)':<28}{t_cvx:>12.4f}{1.0:>10.1f}")
    print(f"{'fast (numba, all threads)':<28}{t_fast:>12.5f}{t_cvx / t_fast:>10.1f}")
    print(f"# active duals per sample: {np.mean((LAM > 0).sum(axis=1)):.0f} of {B.shape[1]}; "
          f"max KKT residual {RES.max():.1e}; max relative difference of v - t vs cvxpy {dv:.1e}")



def whole():
    # 2. whole analysis
    P, M, N, n_t = 100, 50, 2048, 200
    X, y = gauss(P, M, N)
    t0, c0 = time.perf_counter(), time.process_time()
    K = X @ X.T
    t_gram, c_gram = time.perf_counter() - t0, time.process_time() - c0
    T, SGN, B = draws(X, P, y, n_t)
    LAM = np.zeros_like(B)
    t0, c0 = time.perf_counter(), time.process_time()
    _solve_fast(K, X, True, SGN, B, LAM, block=_block(P))
    t_solve, c_solve = time.perf_counter() - t0, time.process_time() - c0
    del K
    t0, c0 = time.perf_counter(), time.process_time()
    r = glue_analysis(X, y, n_t=n_t, seed=0)
    t_all, c_all = time.perf_counter() - t0, time.process_time() - c0
    print(f"\n## whole glue_analysis (P={P}, M={M}, N={N}, n_t={n_t}, no projection)")
    print(f"{'stage':<34}{'wall s':>10}{'CPU s':>10}")
    print(f"{'Gram X X^T (once)':<34}{t_gram:>10.2f}{c_gram:>10.2f}")
    print(f"{'dual solves (n_t samples)':<34}{t_solve:>10.2f}{c_solve:>10.2f}")
    print(f"{'whole analysis':<34}{t_all:>10.2f}{c_all:>10.2f}")
    print(f"# capacity {r.capacity:.4f}, active duals per sample {r.n_active_mean:.0f} of {P * M}, "
          f"cvxpy fallbacks {r.n_cvxpy_fallback}, largest KKT residual {r.kkt_residual_max:.1e}; "
          f"load average {os.getloadavg()[0]:.1f}", flush=True)



def growth():
    print("\n## growth (whole analysis, n_t=50; the other sizes at P=50, M=50, N=512)")
    print(f"{'vary':<6}{'value':>8}{'wall s':>10}{'CPU s':>10}{'active':>9}")
    for name, values in (("P", (25, 50, 100)), ("M", (10, 25, 50, 100)), ("N", (128, 512, 2048))):
        for v in values:
            P, M, N = (v if name == "P" else 50), (v if name == "M" else 50), (v if name == "N" else 512)
            X, y = gauss(P, M, N, seed=v)
            t0, c0 = time.perf_counter(), time.process_time()
            r = glue_analysis(X, y, n_t=50, seed=0)
            print(f"{name:<6}{v:>8}{time.perf_counter() - t0:>10.2f}{time.process_time() - c0:>10.2f}"
                  f"{r.n_active_mean:>9.0f}", flush=True)
    print(f"# load average {os.getloadavg()[0]:.1f}")

if __name__ == "__main__":
    main()
