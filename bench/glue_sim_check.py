"""GLUE capacity vs simulated capacity of the same ensemble on the reference MFTMA cases (issue 18).

    nice -n 5 python bench/glue_sim_check.py                 # cases a and b, random and one_vs_rest
    python bench/glue_sim_check.py --cases a --n-t 300 --n-rep 200

Inputs: tests/data/mftma/<case>.npz (copies of ../shared/reference/mftma/inputs). For each case and
ensemble: GLUE (glue_analysis, n_t samples) and the simulation (empirical_capacity, bias=False,
n_rep trials); E[a] against the mean simulated critical dimension minus 1/2, each with its standard
error, the bisection's P / N_c, the relative difference of the capacities (GLUE / bisection - 1) and
the mean-based one (P / E[a] against P / (mean crit - 1/2)).
"""
from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np

from geomprobe import empirical_capacity, glue_analysis

CASES = {"a": "a_gauss_P10_M20_N100", "b": "b_gauss_P50_M50_N500"}


def load(case: str):
    root = Path(__file__).resolve().parent.parent
    path = root / "tests" / "data" / "mftma" / f"{case}.npz"
    if not path.exists():
        path = root.parent / "shared" / "reference" / "mftma" / "inputs" / f"{case}.npz"
    d = np.load(path, allow_pickle=False)
    P = json.loads(str(d["meta"]))["P"]
    return [d[f"X_{i:03d}"].astype(np.float64).T for i in range(P)]


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--cases", default="ab")
    ap.add_argument("--n-t", type=int, default=300)
    ap.add_argument("--n-rep", type=int, default=100)
    args = ap.parse_args(argv)
    print(f"# n_t = {args.n_t}, n_rep = {args.n_rep}; load average {os.getloadavg()[0]:.1f}")
    print(f"{'case':<24}{'ensemble':<13}{'GLUE cap':>9}{'E[a] +- se':>17}{'sim crit-1/2 +- se':>21}"
          f"{'sim P/N_c':>10}{'rel diff':>9}{'mean-based':>11}{'s':>6}")
    for c in args.cases:
        Xs = load(CASES[c])
        for dich in ("random", "one_vs_rest"):
            t0 = time.perf_counter()
            r = glue_analysis(Xs, dichotomies=dich, n_t=args.n_t, seed=11)
            e = empirical_capacity(Xs, dichotomies=dich, n_rep=args.n_rep, seed=12, bias=False)
            crit = e.critical_n.astype(float)
            se_a = r.a.std(ddof=1) / np.sqrt(r.a.size)
            se_c = crit.std(ddof=1) / np.sqrt(crit.size)
            print(f"{CASES[c]:<24}{dich:<13}{r.capacity:>9.4f}{r.E_a:>10.2f} +- {se_a:4.2f}"
                  f"{crit.mean() - 0.5:>14.2f} +- {se_c:4.2f}{e.capacity:>10.4f}"
                  f"{r.capacity / e.capacity - 1:>+9.1%}{(crit.mean() - 0.5) / r.E_a - 1:>+11.1%}"
                  f"{time.perf_counter() - t0:>6.0f}", flush=True)


if __name__ == "__main__":
    main()
