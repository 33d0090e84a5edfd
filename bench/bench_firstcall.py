"""First call of each public metric in a fresh Python process, with a cold and a warm numba cache.

Every numba kernel of geomprobe is compiled with ``cache=True``: the first process compiles it
(seconds) and writes the machine code to the cache; later processes load it. This script measures,
per public metric, in fresh processes:

  cold   NUMBA_CACHE_DIR = an empty folder (the metric's kernels are compiled, as on a first run)
  warm   the same folder again, now filled by the cold run (the kernels are loaded from the cache)
  2nd    the second call in the warm process (the computation alone; first - 2nd = JIT overhead)
  cpu    CPU time (all threads) of the warm first call: on a loaded machine the wall time includes
         waiting for a core, the CPU time does not (on an idle machine they are about equal)

``import`` is the time of ``import geomprobe`` in the warm process (not counted in the first call).
The inputs are small (the computation takes milliseconds), so the first call is almost all
compilation (cold) or cache loading (warm). Target: warm first call <= 1 s.

    python bench/bench_firstcall.py              # every metric, one cold and one warm process each
    python bench/bench_firstcall.py --only alignment manifold_analysis --repeat 3
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

# Each case: (name, set-up code, call code). The set-up runs before the clock starts.
_SETUP = """
import numpy as np
rng = np.random.default_rng(0)
X = rng.standard_normal((500, 64)).astype(np.float32)
y = np.repeat(np.arange(10), 50)
Xm = rng.standard_normal((5 * 20, 64))
ym = np.repeat(np.arange(5), 20)
"""

CASES: list[tuple[str, str, str]] = [
    ("alignment", "", "gp.alignment(X, y)"),
    ("AlignmentAccumulator", "", "gp.AlignmentAccumulator().update(X, y).compute()"),
    ("gradient_diversity", "", "gp.gradient_diversity(X, y)"),
    ("cosine_stiffness", "", "gp.cosine_stiffness(X, y)"),
    ("minibatch_alignment", "", "gp.minibatch_alignment(X, y, batch_size=100, seed=0)"),
    ("pairwise_stats", "", "gp.pairwise_stats(X, y)"),
    ("sign_stiffness", "", "gp.sign_stiffness(X, y)"),
    ("gradient_confusion", "", "gp.gradient_confusion(X)"),
    ("manifold_analysis", "", "gp.manifold_analysis(Xm, ym, n_t=20, n_reps=2, seed=0)"),
    ("empirical_capacity", "", "gp.empirical_capacity(Xm, ym, n_rep=2, seed=0)"),
    ("anchor_points",
     "sD1 = np.vstack([rng.standard_normal((8, 20)), np.ones((1, 20))]); T = rng.standard_normal((9, 50))",
     "gp.anchor_points(sD1, T)"),
    ("ball_capacity", "", "gp.ball_capacity(1.0, 5.0)"),
    ("averaging_classifier", "", "gp.averaging_classifier(X[:400], y[:400], X[400:], y[400:])"),
    ("layerwise_collapse", "split = np.arange(500) >= 400",
     "gp.layerwise_collapse({'a': X, 'b': 2 * X}, y, split)"),
    ("probe_correlations",
     "xh = rng.standard_normal(16); p = gp.make_probe_inputs(xh, [0.0, 0.5, 1.0], 4, seed=0)",
     "gp.probe_correlations(p.inputs, p.inputs, xh, p.rho)"),
    ("normalized_loss", "L = rng.standard_normal((500, 10))", "gp.normalized_loss(L, y, norms=[2.0, 3.0])"),
    ("weight_distance", "W0 = {'w': rng.standard_normal((8, 8))}; W1 = {'w': rng.standard_normal((8, 8))}",
     "gp.weight_distance(W0, W1)"),
    # measures added later (numba: glue_analysis; the companion measures are numpy only)
    ("glue_analysis", "", "gp.glue_analysis(Xm, ym, n_t=20, seed=0)"),
    ("participation_ratio", "", "gp.participation_ratio(X)"),
    ("neural_collapse", "", "gp.neural_collapse(X, y)"),
    ("linear_probe", "", "gp.linear_probe(X, y, seed=0)"),
    ("linear_cka", "", "gp.linear_cka(X, 2 * X)"),
]

_CHILD = """
import json, sys, time
t0 = time.perf_counter()
import geomprobe as gp
t1 = time.perf_counter()
{setup}
{case_setup}
t2 = time.perf_counter()
c2 = time.process_time()
{call}
t3 = time.perf_counter()
c3 = time.process_time()
{call}
t4 = time.perf_counter()
print(json.dumps({{"import": t1 - t0, "first": t3 - t2, "first_cpu": c3 - c2, "second": t4 - t3}}))
"""


def run_case(setup: str, call: str, cache_dir: str) -> dict:
    code = _CHILD.format(setup=_SETUP, case_setup=setup, call=call)
    env = dict(os.environ, NUMBA_CACHE_DIR=cache_dir)
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(f"child failed for {call!r}:\n{out.stderr}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", nargs="+", metavar="NAME", help="measure only these metrics")
    ap.add_argument("--repeat", type=int, default=1, help="warm processes per metric (median reported)")
    args = ap.parse_args(argv)
    import geomprobe as gp

    cases = [c for c in CASES if (not args.only or c[0] in args.only) and hasattr(gp, c[0])]
    if not cases:
        raise SystemExit(f"--only matched none of: {', '.join(c[0] for c in CASES)}")
    try:
        load = os.getloadavg()[0]
    except OSError:
        load = float("nan")
    print(f"# {sys.executable}; load average at start {load:.2f}; {os.cpu_count()} CPUs")
    print(f"{'metric':<22} {'cold 1st':>9} {'warm 1st':>9} {'cpu':>7} {'2nd':>8} {'import':>7}")
    worst = worst_cpu = 0.0
    t_all = time.perf_counter()
    for name, setup, call in cases:
        with tempfile.TemporaryDirectory(prefix="gp-numba-cache-") as d:
            cold = run_case(setup, call, d)
            warms = sorted((run_case(setup, call, d) for _ in range(args.repeat)), key=lambda r: r["first"])
            warm = warms[len(warms) // 2]
        worst = max(worst, warm["first"])
        worst_cpu = max(worst_cpu, warm["first_cpu"])
        print(f"{name:<22} {cold['first']:>8.2f}s {warm['first']:>8.2f}s {warm['first_cpu']:>6.2f}s "
              f"{warm['second']:>7.3f}s {warm['import']:>6.2f}s", flush=True)
    try:
        load = os.getloadavg()[0]
    except OSError:
        load = float("nan")
    print(f"# slowest warm first call: {worst:.2f} s wall, {worst_cpu:.2f} s CPU (target <= 1 s); "
          f"total {time.perf_counter() - t_all:.0f} s; load average at end {load:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
