"""How often the default (spawn) mode selects the reference's K, over many seeds (docs/metrics.md).

    python bench/mftma_k_by_seed.py [N_SEEDS]     # default 30

For the reference cases a, e1, e2 and b (inputs in tests/data/mftma, or ../shared/reference/mftma),
prints the reference's K for its seeds 0-2 and the histogram of K over seeds 0..N_SEEDS-1 of
manifold_analysis(Xs, seed=s, seed_mode="spawn") (K does not depend on n_t, so n_t = 10).
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

from geomprobe.mftma import manifold_analysis

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "tests" / "data" / "mftma"
SHARED = ROOT / ".." / "shared" / "reference" / "mftma" / "inputs"


def main(n_seeds: int = 30) -> None:
    print("| case | reference K (seeds 0-2) | K histogram over our seeds |")
    print("|---|---|---|")
    for case in ("a_gauss_P10_M20_N100", "e1_M1_P20_N50", "e2_dup_P20_M20_N100", "b_gauss_P50_M50_N500"):
        p = DATA / f"{case}.npz"
        if not p.exists():
            p = SHARED / f"{case}.npz"
        if not p.exists():
            print(f"| {case} | input not found | |")
            continue
        d = np.load(p, allow_pickle=False)
        P = json.loads(str(d["meta"]))["P"]
        Xs = [d[f"X_{i:03d}"].astype(np.float64).T for i in range(P)]
        ref = [json.loads((DATA / f"{case}__seed{s}.json").read_text())["K"] for s in range(3)]
        ks = [manifold_analysis(Xs, seed=s, n_t=10, seed_mode="spawn").K for s in range(n_seeds)]
        hist = {int(k): int(c) for k, c in zip(*np.unique(ks, return_counts=True))}
        print(f"| {case} | {ref} | {hist} |")


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 30)
