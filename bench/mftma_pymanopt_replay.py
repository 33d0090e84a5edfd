"""Record pymanopt 0.2.5 conjugate-gradient fits of the MFTMA center cost from fixed starts.

Writes tests/data/mftma/pymanopt025_cg_replay.npz, which tests/test_mftma_centers.py replays through
geomprobe's fit_frame_pymanopt (seed_mode="reference"'s optimiser). Needs pymanopt 0.2.5 importable
(it is not a dependency: ``pip download pymanopt==0.2.5 --no-deps`` and put the unpacked wheel on
PYTHONPATH):

    PYTHONPATH=/path/to/pymanopt-0.2.5 python bench/mftma_pymanopt_replay.py

Cases: the centers of reference case a (P = 10) and of 12 antipodal-pair centers with a shared
offset (P = 12), K = 1, 2, 3, three Stiefel starts each (pymanopt's own Stiefel.rand() under
np.random.seed(100 + i)); each start is fitted with pymanopt's defaults (maxiter 1000) and with
maxiter = 15 (a short trajectory whose end point must match to rounding). The Euclidean cost and
gradient handed to pymanopt are a plain numpy transcription of the cost in
geomprobe/_kernels/mftma_centers.py.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "tests" / "data" / "mftma" / "pymanopt025_cg_replay.npz"


def cost_grad(Y, V):
    C = Y @ Y.T
    c = Y @ V
    M = C - c @ c.T
    iv = 1.0 / np.diag(M)
    W = M * iv[:, None] * iv[None, :]
    u = (W * M).sum(1)
    return 0.5 * u.sum(), -2.0 * (Y.T @ (W @ c - (u * iv)[:, None] * c))


def centers_case_a():
    d = np.load(ROOT / "tests" / "data" / "mftma" / "a_gauss_P10_M20_N100.npz", allow_pickle=False)
    P = json.loads(str(d["meta"]))["P"]
    return np.stack([d[f"X_{i:03d}"].astype(np.float64).mean(axis=1) for i in range(P)])


def centers_antipodal(P=12, N=40, seed=3):
    rng = np.random.default_rng(seed)
    half = rng.standard_normal((P // 2, N))
    return np.concatenate([half, -half]) + 0.3 * rng.standard_normal(N) + 0.05 * rng.standard_normal((P, N))


def basis(centers):
    Xb = centers - centers.mean(axis=0)
    R = np.linalg.qr(Xb.T, mode="r")
    R = R * np.where(np.diag(R) < 0, -1.0, 1.0)[:, None]
    n = min(centers.shape[0] - 1, centers.shape[1])
    return np.ascontiguousarray(R[:n].T)


def main():
    from pymanopt import Problem
    from pymanopt.manifolds import Stiefel
    from pymanopt.solvers import ConjugateGradient

    out = {}
    rows = []
    for name, centers in (("a", centers_case_a()), ("antipodal", centers_antipodal())):
        Y = basis(centers)
        out[f"Y_{name}"] = Y
        n = Y.shape[1]
        for K in (1, 2, 3):
            man = Stiefel(n, K)
            prob = Problem(man, cost=lambda V: cost_grad(Y, V)[0], egrad=lambda V: cost_grad(Y, V)[1],
                           verbosity=0)
            for i in range(3):
                np.random.seed(100 + i)
                V0 = man.rand()
                for maxiter in (1000, 15):
                    solver = ConjugateGradient(logverbosity=1, maxiter=maxiter)
                    V, log = solver.solve(prob, x=V0.copy())
                    key = f"{name}_K{K}_s{i}_it{maxiter}"
                    out[f"V0_{key}"] = V0
                    out[f"V_{key}"] = V
                    out[f"f_{key}"] = np.float64(log["final_values"]["f(x)"])
                    out[f"iters_{key}"] = np.int64(log["final_values"]["iterations"])
                    rows.append((key, log["final_values"]["iterations"], log["stoppingreason"][:40]))
    np.savez_compressed(OUT, **out)
    for r in rows:
        print(*r, sep="\t")


if __name__ == "__main__":
    main()
