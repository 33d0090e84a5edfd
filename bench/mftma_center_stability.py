"""MFTMA center model on structured data (issue 20): K and capacity over seeds, old rule vs new rule.

    python bench/mftma_center_stability.py [--seeds 10] [--old-tree /tmp/oldrev_c]

Cases: Fashion-MNIST pixel manifolds (the first 50 training images of each of the 10 classes,
/usr/share/datasets/fashion-mnist, pixels / 255), 30 correlated low-dimensional ellipsoids and 20
antipodal spheres (generators in tests/test_mftma_centers.py, seed 0). For each case and seed,
manifold_analysis(X, labels, seed=s) with default options (seed_mode="spawn", n_t=200, n_reps=10), in a
subprocess whose PYTHONPATH is the old tree (a checkout before the new rule, e.g.
``git worktree add /tmp/oldrev_c e52633f``) or this tree; prints the K histogram, the capacity mean,
sd and range over seeds, and the wall time of all seeds.
"""
from __future__ import annotations

import argparse
import gzip
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
FMNIST = Path("/usr/share/datasets/fashion-mnist")


def fashion_pixels(per_class=50):
    with gzip.open(FMNIST / "train-images-idx3-ubyte.gz") as f:
        imgs = np.frombuffer(f.read(), np.uint8, offset=16).reshape(-1, 784)
    with gzip.open(FMNIST / "train-labels-idx1-ubyte.gz") as f:
        labels = np.frombuffer(f.read(), np.uint8, offset=8)
    idx = np.concatenate([np.flatnonzero(labels == c)[:per_class] for c in range(10)])
    return imgs[idx].astype(np.float64) / 255.0, labels[idx].astype(np.int64)


def case_data(name):
    sys.path.insert(0, str(ROOT / "tests"))
    from test_mftma_centers import antipodal_spheres, correlated_ellipsoids
    if name == "fashion_pixels":
        return fashion_pixels()
    Xs = correlated_ellipsoids(0) if name == "ellipsoids" else antipodal_spheres(0)
    return np.concatenate(Xs), np.repeat(np.arange(len(Xs)), [len(x) for x in Xs])


def _worker(path, n_seeds):
    from geomprobe.mftma import manifold_analysis
    d = np.load(path)
    X, y = d["X"], d["y"]
    manifold_analysis(X, y, seed=99, n_t=10, n_reps=2)      # JIT warm-up
    t0 = time.perf_counter()
    out = [manifold_analysis(X, y, seed=s) for s in range(n_seeds)]
    t = time.perf_counter() - t0
    print(json.dumps({"t": t, "K": [int(r.K) for r in out], "cap": [float(r.capacity) for r in out],
                      "degenerate": sum(any("near-degenerate" in n for n in r.notes) for r in out)}), flush=True)


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", type=int, default=10)
    ap.add_argument("--old-tree", default="/tmp/oldrev_c")
    ap.add_argument("--cases", default="fashion_pixels,ellipsoids,antipodal")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        return _worker(args.worker, args.seeds)
    print(f"# load average {os.getloadavg()[0]:.1f}; {args.seeds} seeds; old = {args.old_tree}", flush=True)
    print("| case | rule | K histogram | capacity mean | sd | range | runs noting near-degenerate | time |")
    print("|---|---|---|---|---|---|---|---|")
    tmp = tempfile.mkdtemp()
    for name in args.cases.split(","):
        X, y = case_data(name)
        path = os.path.join(tmp, f"{name}.npz")
        np.savez(path, X=X, y=y)
        for which, tree in (("old", args.old_tree), ("new", str(ROOT))):
            p = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--worker", path, "--seeds",
                                str(args.seeds)], env=dict(os.environ, PYTHONPATH=tree), capture_output=True,
                               text=True, cwd="/")
            try:
                r = json.loads(p.stdout.strip().splitlines()[-1])
            except Exception:  # noqa: BLE001 - report and go on
                print(f"| {name} | {which} | failed: {p.stderr.strip()[-100:]} |", flush=True)
                continue
            ks, cnt = np.unique(r["K"], return_counts=True)
            cap = np.array(r["cap"])
            print(f"| {name} | {which} | {dict(zip(ks.tolist(), cnt.tolist()))} | {cap.mean():.4f} | "
                  f"{cap.std(ddof=1):.4f} | {cap.min():.4f}-{cap.max():.4f} | {r['degenerate']} | {r['t']:.1f} s |",
                  flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
