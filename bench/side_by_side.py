"""Side-by-side timing of manifold_analysis (P=100, M=50, N=2048) for two checkouts, in alternating
processes (docs/performance.md, MFTMA).

    git worktree add /tmp/old COMMIT
    python bench/side_by_side.py /tmp/old . [--rounds 5]

Each round runs one process per checkout (order alternating); each process warms the JIT up, then
times 5 calls and reports their median. Prints every process median and the median per checkout.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

CHILD = r"""
import sys
# an editable install's import hook would win over PYTHONPATH: drop it so that each checkout is imported
sys.meta_path = [f for f in sys.meta_path if "__editable__" not in str(getattr(f, "__module__", ""))]
import json, time, numpy as np
from geomprobe.mftma import manifold_analysis
rng = np.random.default_rng(0)
P, M, N = 100, 50, 2048
X = np.empty((P * M, N))
for i in range(P):
    c = rng.standard_normal(N) / np.sqrt(N)
    X[i * M:(i + 1) * M] = c + rng.standard_normal((M, N)) / np.sqrt(N)
y = np.repeat(np.arange(P), M)
manifold_analysis(X[:500], y[:500], seed=0, n_t=20)
ts = []
for _ in range(5):
    t0 = time.perf_counter(); r = manifold_analysis(X, y, seed=0); ts.append(time.perf_counter() - t0)
import geomprobe
print(json.dumps({"median": float(np.median(ts)), "capacity": r.capacity, "K": r.K, "where": geomprobe.__file__}))
"""


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("a")
    ap.add_argument("b")
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    res = {args.a: [], args.b: []}
    info = {}
    for r in range(args.rounds):
        for tree in ((args.a, args.b) if r % 2 == 0 else (args.b, args.a)):
            env = dict(os.environ, PYTHONPATH=os.path.abspath(tree))
            out = subprocess.run([sys.executable, "-c", CHILD], env=env, cwd=os.path.abspath(tree), capture_output=True,
                                 text=True, check=True)
            d = json.loads(out.stdout.strip().splitlines()[-1])
            res[tree].append(d["median"])
            info[tree] = d
    print("| checkout | process medians (s) | median (s) | capacity | K |")
    print("|---|---|---|---|---|")
    for tree, ts in res.items():
        ts_sorted = sorted(ts)
        print(f"| {tree} ({info[tree]['where']}) | {', '.join(f'{t:.3f}' for t in ts)} | "
              f"{ts_sorted[len(ts) // 2]:.3f} | {info[tree]['capacity']:.6f} | {info[tree]['K']} |")


if __name__ == "__main__":
    main()
