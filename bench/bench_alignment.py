"""Alignment benchmarks (issue 2 targets), measured side by side in one run, printed as a table.

1. Representation alignment of n = 50,000 x d = 4,096 float32 vs one numpy pass over the same array
   (X.sum(0) plus row norms): target <= 2x, with no n x n memory.
2. Blocked pairwise measures (sign stiffness + confusion) for n = 20,000 x d = 1,024 float32 vs one
   float32 X @ X.T: target <= 1.5x, memory bounded by the block size.

Run:  python bench/bench_alignment.py [--small]
"""
from __future__ import annotations

import argparse
import resource
import time

import numpy as np

import geomprobe as gp


def best_of(fn, repeats=3):
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def peak_rss_mb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--small", action="store_true", help="quick run at 1/4 size")
    a = ap.parse_args()
    f = 4 if a.small else 1
    rng = np.random.default_rng(0)
    rows = []

    n, d = 50_000 // f, 4096
    X = rng.standard_normal((n, d), dtype=np.float32)
    y = rng.integers(0, 10, n)
    gp.alignment(X[:100], y[:100])  # JIT warm-up
    t_base = best_of(lambda: (X.sum(0), np.sqrt(np.einsum("ij,ij->i", X, X))))
    rss0 = peak_rss_mb()
    t_al = best_of(lambda: gp.alignment(X, y))
    rows.append((f"alignment n={n} d={d} f32", t_al, "X.sum(0) + row norms", t_base, 2.0,
                 peak_rss_mb() - rss0))
    del X

    n, d = 20_000 // f, 1024
    X = rng.standard_normal((n, d), dtype=np.float32)
    y = rng.integers(0, 10, n)
    gp.pairwise_stats(X[:50], y[:50])
    t_gemm = best_of(lambda: X @ X.T, repeats=2)
    rss0 = peak_rss_mb()
    t_pw = best_of(lambda: gp.pairwise_stats(X, y, block_size=2048), repeats=2)
    rows.append((f"pairwise n={n} d={d} f32", t_pw, "X @ X.T (f32)", t_gemm, 1.5, peak_rss_mb() - rss0))

    print(f"{'measure':34s} {'geomprobe s':>12s} {'baseline':24s} {'base s':>8s} {'ratio':>6s} {'target':>6s} {'extra RSS MB':>12s}")
    for name, t, bname, tb, target, mem in rows:
        print(f"{name:34s} {t:12.3f} {bname:24s} {tb:8.3f} {t / tb:6.2f} {'<=' + str(target):>6s} {mem:12.0f}")


if __name__ == "__main__":
    main()
