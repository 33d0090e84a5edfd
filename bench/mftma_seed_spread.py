"""Seed-to-seed spread of MFTMA aggregates on the reference cases, in both seed modes.

Shows that the reference's three published seeds (0-2) understate the sampling noise of n_t = 200.
Run:  python bench/mftma_seed_spread.py [--seeds 8]   (needs ../shared/reference/mftma or tests/data)
"""
import argparse
import pathlib

import numpy as np

from geomprobe import manifold_analysis

ROOT = pathlib.Path(__file__).resolve().parents[1]
CANDIDATES = [ROOT.parent / "shared/reference/mftma/inputs", ROOT / "tests/data/mftma"]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", type=int, default=8)
    ap.add_argument("--cases", nargs="+", default=["a_gauss_P10_M20_N100", "e2_dup_P20_M20_N100"])
    a = ap.parse_args()
    print(f"{'case':24s} {'mode':9s} " + " ".join(f"s{s:<6d}" for s in range(a.seeds)) + "   mean    std")
    for case in a.cases:
        path = next((d / f"{case}.npz" for d in CANDIDATES if (d / f"{case}.npz").exists()), None)
        if path is None:
            print(f"{case}: input not found")
            continue
        d = np.load(path, allow_pickle=False)
        Xs = [d[k].T.astype(np.float64) for k in sorted(k for k in d.files if k.startswith("X_"))]
        for mode in ("reference", "spawn"):
            caps = [manifold_analysis(Xs, seed=s, seed_mode=mode).capacity for s in range(a.seeds)]
            print(f"{case:24s} {mode:9s} " + " ".join(f"{c:.4f}" for c in caps)
                  + f"  {np.mean(caps):.4f} {np.std(caps, ddof=1):.4f}")


if __name__ == "__main__":
    main()
