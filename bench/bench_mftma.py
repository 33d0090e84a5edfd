"""MFTMA benchmarks: prints a table (see docs/performance.md, section MFTMA).

    python bench/bench_mftma.py            # everything (scale case needs ~3 GB of RAM)
    python bench/bench_mftma.py --quick    # skip the N = 65,536 scale case
    python bench/bench_mftma.py --scale [--cases 10x50,10x1000] [--old-rev REV] [--timeout S]

--scale (issue 20): manifold_analysis (default options, float32 Gaussian clouds from gauss(), n_t = 200,
n_reps = 10, N = 2048) for each case PxM, each in a fresh subprocess after a JIT warm-up, for this
working tree ("new") and for the package at git revision REV ("old", default e52633f, before the
anchor work of issue 20) exported with `git archive` into a temporary folder. Old and new run one after
the other in the same invocation, so their ratio is measured under the same load; the table also gives
the largest relative difference of the per-class alpha, R and D between old and new (same seed). A run
longer than --timeout seconds (default 300) is stopped and reported as "> S". Default cases: the M
curve at P = 10 (50, 200, 500, 1000, 2000) and the paper size P = 100, M = 50.

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
#: --scale default cases (P x M at N = 2048): the M curve at P = 10, then the paper size.
SCALE_CASES = "10x50,10x200,10x500,10x1000,10x2000,100x50"


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
    ap.add_argument("--scale", action="store_true", help="issue 20 scale table, old vs new")
    ap.add_argument("--old-rev", default="e52633f", help="git revision timed as 'old' by --scale")
    ap.add_argument("--new-rev", default=None, help="git revision timed as 'new' (default: the working tree)")
    ap.add_argument("--timeout", type=float, default=300.0, help="seconds per --scale run")
    ap.add_argument("--cases", default=SCALE_CASES, help="--scale cases PxM, comma separated (N = 2048)")
    ap.add_argument("--worker", nargs=3, metavar=("P", "M", "N"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        return _worker(*map(int, args.worker))
    if args.scale:
        return _scale(args)
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


def _worker(P, M, N):
    """One timed manifold_analysis in this process (after a JIT warm-up); prints a JSON line."""
    X, y = gauss(P, M, N, seed=0, dtype=np.float32)
    step = max(1, M // 20)
    manifold_analysis(X[::step], y[::step], seed=1, n_t=20)         # JIT warm-up, every class
    t0 = time.perf_counter()
    r = manifold_analysis(X, y, seed=0)
    out = {"t": time.perf_counter() - t0, "K": int(r.K), "capacity": float(r.capacity),
           "per_class": np.concatenate([r.class_capacity, r.class_radius, r.class_dimension]).tolist()}
    print(json.dumps(out), flush=True)


def _scale(args):
    import subprocess
    import tempfile

    cases = [tuple(int(v) for v in c.split("x")) for c in args.cases.split(",")]
    N = 2048
    with tempfile.TemporaryDirectory() as tmp:
        trees = {}
        for which, rev in (("old", args.old_rev), ("new", args.new_rev)):
            if rev is None:
                trees[which] = str(ROOT)
                continue
            trees[which] = os.path.join(tmp, which)
            os.mkdir(trees[which])
            arch = subprocess.run(["git", "-C", str(ROOT), "archive", rev, "geomprobe"],
                                  check=True, capture_output=True).stdout
            subprocess.run(["tar", "-x", "-C", trees[which]], input=arch, check=True)
        for path in trees.values():     # fill each tree's numba cache (not timed)
            subprocess.run([sys.executable, str(Path(__file__).resolve()), "--worker", "3", "20", "64"],
                           env=dict(os.environ, PYTHONPATH=path), capture_output=True, cwd=tmp)
        print(f"# threads available: {len(os.sched_getaffinity(0))}; load average "
              f"{os.getloadavg()[0]:.1f}; old = {args.old_rev}, new = {args.new_rev or 'working tree'}; "
              f"N = {N}", flush=True)
        print("| P | M | old | new | old / new | K old / new | capacity old / new | max rel diff alpha_i, R_i, D_i |")
        print("|---|---|---|---|---|---|---|---|", flush=True)
        for P, M in cases:
            res = {}
            for which, path in trees.items():
                env = dict(os.environ, PYTHONPATH=path)
                try:
                    p = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--worker", str(P), str(M),
                                        str(N)], env=env, capture_output=True, text=True, timeout=args.timeout,
                                       cwd=tmp)
                    res[which] = json.loads(p.stdout.strip().splitlines()[-1])
                except subprocess.TimeoutExpired:
                    res[which] = None
                except Exception as exc:  # noqa: BLE001 - report and go on
                    res[which] = {"error": str(exc)[:80]}
            o, n = res["old"], res["new"]

            def fmt(r):
                return f"> {args.timeout:.0f} s" if r is None else f"{r['t']:.2f} s" if "t" in r else r.get("error", "?")

            ok_o, ok_n = bool(o and "t" in o), bool(n and "t" in n)
            ratio = (f"{o['t'] / n['t']:.1f}" if ok_o and ok_n else
                     f"> {args.timeout / n['t']:.1f}" if o is None and ok_n else "-")
            ks = f"{o['K'] if ok_o else '-'} / {n['K'] if ok_n else '-'}"
            caps = f"{o['capacity']:.4f} / {n['capacity']:.4f}" if ok_o and ok_n else (
                f"- / {n['capacity']:.4f}" if ok_n else "-")
            diff = "-"
            if ok_o and ok_n and o["K"] == n["K"]:
                a, b = np.array(o["per_class"]), np.array(n["per_class"])
                diff = f"{float(np.max(np.abs(a - b) / np.maximum(np.abs(a), 1e-300))):.1e}"
            print(f"| {P} | {M} | {fmt(o)} | {fmt(n)} | {ratio} | {ks} | {caps} | {diff} |", flush=True)


if __name__ == "__main__":
    sys.exit(main())
