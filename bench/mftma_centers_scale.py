"""MFTMA center model (issue 20): growth in P, old rule vs new rule, side by side in one run.

    python bench/mftma_centers_scale.py [--P 10,100,300,1000] [--old-tree /tmp/oldrev_c] [--timeout S]
    python bench/mftma_centers_scale.py --paper        # whole manifold_analysis at P=100, M=50, N=2048

The old tree is a checkout of the revision before the new rule, e.g.
``git worktree add /tmp/oldrev_c e52633f``. Each measurement runs in a fresh subprocess (PYTHONPATH =
the tree) after a JIT warm-up at P = 10; old and new alternate per row, so their ratio is measured under
the same load. Centers: P class means of Gaussian clouds as in bench_mftma.gauss (center c ~ N(0, I/N)
plus the mean of M = 50 points of N(0, I/N) noise), N = 2048, float64, seed 0; fit_center_model with
the default options (n_reps = 10, K = None), both cores, BLAS limited to 1 thread as in manifold_analysis. A run longer than --timeout seconds is
stopped and reported as "> S".
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def centers(P, M=50, N=2048, seed=0):
    rng = np.random.default_rng(seed)
    c = rng.standard_normal((P, N)) / np.sqrt(N)
    return c + rng.standard_normal((P, N)) / np.sqrt(N * M)


def _worker(P: int, paper: bool) -> None:
    from geomprobe.mftma import manifold_analysis
    from geomprobe.mftma.centers import fit_center_model
    if paper:
        sys.path.insert(0, str(ROOT / "bench"))
        from bench_mftma import gauss
        X, y = gauss(100, 50, 2048)
        manifold_analysis(X[:500], y[:500], seed=0, n_t=20)          # JIT warm-up
        ts = []
        for _ in range(3):
            t0 = time.perf_counter()
            r = manifold_analysis(X, y, seed=0)
            ts.append(time.perf_counter() - t0)
        print(json.dumps({"t": float(np.median(ts)), "K": int(r.K), "capacity": float(r.capacity)}), flush=True)
        return
    from geomprobe.mftma._data import blas_threads
    fit_center_model(centers(10), np.random.default_rng(1), n_threads=2)   # JIT warm-up
    C = centers(P)
    # BLAS limited to 1 thread, as inside manifold_analysis (unlimited, the basis QR of a 2048 x 100
    # matrix took 1.1 s of 1.5 s here: thread start-up under load)
    with blas_threads(1):
        t0 = time.perf_counter()
        cm = fit_center_model(C, np.random.default_rng(0), n_threads=len(os.sched_getaffinity(0)))
        t = time.perf_counter() - t0
    print(json.dumps({"t": t, "K": int(cm.K), "fits": int(cm.n_fits), "iters": int(cm.cg_iterations),
                      "tried": int(len(cm.res_coeff)), "degenerate": bool(getattr(cm, "degenerate", False))}),
          flush=True)


def _run(tree: str, P: int, paper: bool, timeout: float):
    env = dict(os.environ, PYTHONPATH=tree)
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", str(P)] + (["--paper"] if paper else [])
    try:
        p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout, cwd="/")
        return json.loads(p.stdout.strip().splitlines()[-1])
    except subprocess.TimeoutExpired:
        return None
    except Exception as exc:  # noqa: BLE001 - report and go on
        return {"error": str(exc)[:80]}


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--P", default="10,100,300,1000")
    ap.add_argument("--old-tree", default="/tmp/oldrev_c")
    ap.add_argument("--timeout", type=float, default=300.0)
    ap.add_argument("--paper", action="store_true")
    ap.add_argument("--worker", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker is not None:
        return _worker(args.worker, args.paper)
    print(f"# load average {os.getloadavg()[0]:.1f}; threads {len(os.sched_getaffinity(0))}; "
          f"old = {args.old_tree}, new = {ROOT}", flush=True)
    fmt = lambda r: (f"> {args.timeout:.0f} s" if r is None else f"{r['t']:.2f} s" if "t" in r else r.get("error"))
    if args.paper:
        res = {w: _run(t, 100, True, args.timeout) for w, t in (("old", args.old_tree), ("new", str(ROOT)))}
        o, n = res["old"], res["new"]
        print("| manifold_analysis P=100 M=50 N=2048 | old | new | old / new | K old / new | capacity old / new |")
        print("|---|---|---|---|---|---|")
        ratio = f"{o['t'] / n['t']:.2f}" if o and n and "t" in o and "t" in n else "-"
        print(f"| median of 3 | {fmt(o)} | {fmt(n)} | {ratio} | {o and o.get('K')} / {n and n.get('K')} | "
              f"{o and o.get('capacity', float('nan')):.4f} / {n and n.get('capacity', float('nan')):.4f} |")
        return 0
    print("| P | old | new | old / new | K old / new | fits old / new | iterations old / new | K tried (new) |")
    print("|---|---|---|---|---|---|---|---|")
    for P in (int(v) for v in args.P.split(",")):
        res = {w: _run(t, P, False, args.timeout) for w, t in (("old", args.old_tree), ("new", str(ROOT)))}
        o, n = res["old"], res["new"]
        ok = o and n and "t" in o and "t" in n
        ratio = f"{o['t'] / n['t']:.1f}" if ok else (f"> {args.timeout / n['t']:.0f}" if o is None and n and "t" in n else "-")
        g = lambda r, k: r.get(k, "-") if r else "-"
        print(f"| {P} | {fmt(o)} | {fmt(n)} | {ratio} | {g(o, 'K')} / {g(n, 'K')} | {g(o, 'fits')} / {g(n, 'fits')} | "
              f"{g(o, 'iters')} / {g(n, 'iters')} | {g(n, 'tried')}{' (degenerate)' if n and n.get('degenerate') else ''} |",
              flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
