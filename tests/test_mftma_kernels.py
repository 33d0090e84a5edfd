"""MFTMA kernels against the reference files and against plain numpy/scipy twins.

Reference numbers: tests/data/mftma (see PROVENANCE.md) and, when present, the full
../shared/reference/mftma relative to the repository root.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from scipy.optimize import linprog, nnls

from geomprobe import AnalysisError, InputError
from geomprobe._kernels.mftma_anchors import anchor_metrics, gram, manifold_metrics, nnls_gram
from geomprobe._kernels.mftma_centers import (
    _qr_retract,
    center_cost,
    center_cost_grad,
    fit_frame,
    residual_stats,
)
from geomprobe._kernels.mftma_simcap import hull_nnls
from geomprobe.mftma import anchor_points
from geomprobe.mftma.anchors import cvxpy_anchors

DATA = Path(__file__).parent / "data" / "mftma"
SHARED = Path(__file__).resolve().parents[1] / ".." / "shared" / "reference" / "mftma"

KERNEL_FILES = [
    "a_gauss_P10_M20_N100__seed0__kernel.npz",
    "e1_M1_P20_N50__seed0__kernel.npz",
    "e2_dup_P20_M20_N100__seed0__kernel.npz",
    "e3_NltM_P20_M50_N30__seed0__kernel_first8.npz",
    "b_gauss_P50_M50_N500__seed0__kernel_first4.npz",
]
FULL_KERNEL_FILES = [f"{c}__seed0__kernel.npz" for c in ("b_gauss_P50_M50_N500", "e3_NltM_P20_M50_N30")]


@pytest.fixture
def rng():
    return np.random.default_rng(12345)


def _manifolds(path: Path):
    d = np.load(path)
    P = len(d["alpha"])
    return d, [(d[f"sD1_{i:03d}"], d[f"tvec_{i:03d}"]) for i in range(P)]


def _check_kernel_file(path: Path, rtol: float = 1e-7):
    d, mans = _manifolds(path)
    for i, (sD1, T) in enumerate(mans):
        res = anchor_points(sD1, T, float(d["kappa"]))
        # alpha, R, D from the stored sD1 and t-vectors: exact solver -> rtol 1e-7 (spec section 6)
        np.testing.assert_allclose(res.alpha, d["alpha"][i], rtol=rtol)
        np.testing.assert_allclose(res.radius, d["R"][i], rtol=rtol, atol=1e-12)
        np.testing.assert_allclose(res.dimension, d["D"][i], rtol=rtol, atol=1e-12)


@pytest.mark.parametrize("name", KERNEL_FILES)
def test_fast_kernel_matches_reference(name):
    _check_kernel_file(DATA / name)


@pytest.mark.parametrize("name", FULL_KERNEL_FILES)
def test_fast_kernel_matches_full_shared_reference(name):
    path = SHARED / "results" / name
    if not path.exists():
        pytest.skip("../shared/reference/mftma not present")
    _check_kernel_file(path)


def test_cvxpy_path_matches_reference():
    # Clarabel at 1e-12 tolerances reproduces the reference alpha, R, D to rtol 1e-8 (measured worst
    # 1.4e-10 on manifolds 0-2 of case a); anchors agree with the exact solver to 1e-7.
    d, mans = _manifolds(DATA / "a_gauss_P10_M20_N100__seed0__kernel.npz")
    for i in (0, 1):
        sD1, T = mans[i]
        res = anchor_points(sD1, T[:, :60], 0.0, solver="cvxpy")
        fast = anchor_points(sD1, T[:, :60], 0.0)
        np.testing.assert_allclose([res.alpha, res.radius, res.dimension],
                                   [fast.alpha, fast.radius, fast.dimension], rtol=1e-8)
        np.testing.assert_allclose(res.anchors, fast.anchors, atol=1e-7)
    sD1, T = mans[0]
    res = anchor_points(sD1, T, 0.0, solver="cvxpy")
    np.testing.assert_allclose([res.alpha, res.radius, res.dimension],
                               [d["alpha"][0], d["R"][0], d["D"][0]], rtol=1e-8)


def _numpy_anchor_twin(sD1, T, kappa):
    """Plain scipy twin: one scipy.optimize.nnls per sample (dual of the anchor QP)."""
    d1, n_t = T.shape
    anchors = np.empty_like(T)
    for s in range(n_t):
        t = T[:, s]
        proj = sD1.T @ t
        j = int(np.argmax(proj))
        anchors[:, s] = sD1[:, j]
        if proj[j] + kappa >= 0:
            tp = t.copy()
            tp[-1] += kappa
            z, _ = nnls(sD1, tp, maxiter=50 * sD1.shape[1])
            az = sD1 @ z
            if np.linalg.norm(az) >= 1e-8:
                anchors[:, s] = az / az[-1]
    ts = np.maximum((T * anchors).sum(0) + kappa, 0)
    ss = (anchors ** 2).sum(0)
    alpha = 1 / np.mean(np.where(ss > 0, ts ** 2 / ss, 0))
    D = d1 - 1
    ds = (anchors[:D] - anchors[:D].mean(1, keepdims=True)) / anchors[D]
    R = np.sqrt(np.mean((ds ** 2).sum(0)))
    th = T[:D] / np.linalg.norm(T[:D], axis=0)
    sh = anchors[:D] / np.sqrt((anchors[:D] ** 2).sum(0) + 1e-12)
    return alpha, R, D * np.mean((th * sh).sum(0)) ** 2, anchors


@pytest.mark.parametrize("kind", ["generic", "duplicates", "N<m", "point"])
@pytest.mark.parametrize("kappa", [0.0, 0.3])
def test_anchor_kernel_matches_numpy_twin(rng, kind, kappa):
    D, m = {"generic": (8, 6), "duplicates": (8, 6), "N<m": (4, 12), "point": (1, 1)}[kind]
    S = rng.standard_normal((D, m)) * 0.7
    if kind == "duplicates":
        S[:, 3:] = S[:, :3]
    if kind == "point":
        S[:] = 0.0
    sD1 = np.vstack([S, np.ones((1, m))])
    T = rng.standard_normal((D + 1, 150))
    res = anchor_points(sD1, T, kappa)
    a, R, Dm, anchors = _numpy_anchor_twin(sD1, T, kappa)
    np.testing.assert_allclose(res.anchors, anchors, atol=1e-9)
    np.testing.assert_allclose([res.alpha, res.radius, res.dimension], [a, R, Dm], rtol=1e-8, atol=1e-12)
    out = manifold_metrics(sD1, T, kappa, 5000)
    np.testing.assert_allclose(out[:3], [a, R, Dm], rtol=1e-8, atol=1e-12)
    if kind == "point" and kappa == 0.0:
        assert res.radius == 0 and res.dimension == 0


def test_nnls_gram_matches_scipy(rng):
    for _ in range(30):
        A = rng.standard_normal((7, 10))
        A[:, 5:] = A[:, :5] if rng.random() < 0.5 else A[:, 5:]
        t = rng.standard_normal(7)
        z = np.empty(10)
        assert nnls_gram(gram(A), A.T @ t, z, 10000) >= 0
        z_ref, _ = nnls(A, t)
        np.testing.assert_allclose(A @ z, A @ z_ref, atol=1e-10)
        assert np.all(z >= 0)


def test_anchor_metrics_formulas(rng):
    # anchors given directly: the metric formulas of spec section 4 step 14
    T = rng.standard_normal((4, 50))
    anchors = np.vstack([rng.standard_normal((3, 50)), np.ones((1, 50))])
    a, R, D = anchor_metrics(T, anchors, 0.0)
    ts = np.maximum((T * anchors).sum(0), 0)
    assert a == pytest.approx(1 / np.mean(ts ** 2 / (anchors ** 2).sum(0)), rel=1e-12)


def _numpy_center_cost(Y, V):
    Rm = Y - Y @ V @ V.T
    Rn = Rm / np.linalg.norm(Rm, axis=1, keepdims=True)
    return 0.5 * np.sum((Rn @ Rn.T) ** 2)


def test_center_cost_and_gradient_match_numpy_twin(rng):
    Y = rng.standard_normal((9, 8))
    C = Y @ Y.T
    for K in (1, 3):
        V = np.linalg.qr(rng.standard_normal((8, K)))[0]
        f, G = center_cost_grad(Y, C, V)
        assert f == pytest.approx(_numpy_center_cost(Y, V), rel=1e-12)
        assert center_cost(Y, C, V) == pytest.approx(f, rel=1e-12)
        E = rng.standard_normal(V.shape)
        h = 1e-6
        fd = (center_cost(Y, C, V + h * E) - center_cost(Y, C, V - h * E)) / (2 * h)
        assert np.sum(G * E) == pytest.approx(fd, rel=1e-6)
        Q = _qr_retract(V + 0.1 * E)
        np.testing.assert_allclose(Q.T @ Q, np.eye(K), atol=1e-12)
        rc, stab, _ = residual_stats(Y, C, V)
        Rm = Y - Y @ V @ V.T
        Rn = Rm / np.linalg.norm(Rm, axis=1, keepdims=True)
        cos = np.abs(Rn @ Rn.T)
        assert rc == pytest.approx((cos.sum() - 9) / 72, rel=1e-12)
        assert stab == pytest.approx(np.min(np.linalg.norm(Rm, axis=1) / np.linalg.norm(Y, axis=1)), rel=1e-12)


def test_center_fit_lowers_cost_and_reaches_stationarity(rng):
    Y = rng.standard_normal((12, 11))
    C = Y @ Y.T
    V0 = np.linalg.qr(rng.standard_normal((11, 2)))[0]
    V, f, it, gn = fit_frame(Y, C, V0, 2000, 1e-7, 1e-14)
    assert f < center_cost(Y, C, V0)
    assert gn < 1e-5
    np.testing.assert_allclose(V.T @ V, np.eye(2), atol=1e-12)


def _lp_separable(A):
    m, d = A.shape
    c = np.zeros(d + 1)
    c[-1] = -1
    r = linprog(c, A_ub=np.hstack([-A, np.ones((m, 1))]), b_ub=np.zeros(m),
                bounds=[(-1, 1)] * d + [(None, 1)], method="highs")
    return -r.fun > 1e-9


def test_hull_nnls_separability_matches_lp_twin(rng):
    for trial in range(80):
        m, n = int(rng.integers(2, 40)), int(rng.integers(1, 12))
        X = rng.standard_normal((m, n))
        y = np.where(rng.random(m) < 0.5, 1.0, -1.0)
        if trial % 4 == 0:
            X, y = np.vstack([X, X[:3]]), np.concatenate([y, y[:3]])
        A = np.ascontiguousarray(y[:, None] * np.hstack([X, np.ones((len(y), 1))]))
        z, u, r1, status = hull_nnls(A, 100000)
        assert status == 0
        sep = r1 > 0 and (A @ u).min() > 0
        assert sep == _lp_separable(A)


def test_kernels_run_without_jit(tmp_path):
    code = (
        "import numpy as np\n"
        "from geomprobe.mftma import anchor_points, manifold_analysis, empirical_capacity\n"
        "r = np.random.default_rng(0)\n"
        "S = np.vstack([r.standard_normal((3, 4)), np.ones((1, 4))])\n"
        "a = anchor_points(S, r.standard_normal((4, 20)))\n"
        "X = r.standard_normal((24, 6)); y = np.repeat(np.arange(4), 6)\n"
        "m = manifold_analysis(X, y, n_t=10, n_reps=2, seed=0)\n"
        "e = empirical_capacity(X, y, n_rep=4, seed=0)\n"
        "print(a.alpha, m.capacity, e.n_tests)\n"
    )
    env = dict(os.environ, NUMBA_DISABLE_JIT="1")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr


def test_anchor_points_errors(rng):
    S = np.vstack([rng.standard_normal((3, 4)), np.ones((1, 4))])
    T = rng.standard_normal((4, 5))
    with pytest.raises(InputError, match=r"sD1's last row must be all ones .* column 0"):
        anchor_points(np.vstack([S[:-1], np.full((1, 4), 2.0)]), T)
    with pytest.raises(InputError, match=r"T has 3 rows but sD1 has 4 \(both must be D\+1\)"):
        anchor_points(S, T[:3])
    with pytest.raises(InputError, match=r"sD1 must have at least 2 rows"):
        anchor_points(np.ones((1, 4)), T[:1])
    with pytest.raises(InputError, match=r"kappa must be a finite number >= 0, got -1"):
        anchor_points(S, T, -1)
    with pytest.raises(InputError, match=r"solver must be one of 'fast', 'cvxpy'; got 'osqp'"):
        anchor_points(S, T, solver="osqp")


def test_cvxpy_status_failure_raises(monkeypatch, rng):
    import cvxpy as cp

    S = np.vstack([rng.standard_normal((3, 4)), np.ones((1, 4))])
    T = np.abs(rng.standard_normal((4, 3)))

    def fake_solve(self, *a, **k):
        self._status = "infeasible_inaccurate"
        return None

    monkeypatch.setattr(cp.Problem, "solve", fake_solve)
    monkeypatch.setattr(cp.Problem, "status", property(lambda self: self._status))
    with pytest.raises(AnalysisError, match=r"cvxpy solver CLARABEL returned status 'infeasible_inaccurate' "
                                            r"on the anchor QP of manifold 7, sample 0 \(size: 4 variables, 4 constraints\)"):
        cvxpy_anchors(S, T, 0.0, manifold=7)


def test_center_fit_lbfgs_reaches_the_cg_stationary_points(rng):
    """The default optimiser (L-BFGS) and the reference's CG (exact=True) stop at stationary points
    of the same cost; started from the same frame they find the same minimum on most problems (the
    cost has several local minima, so a different path may end in another one)."""
    same = 0
    for trial in range(10):
        P = int(rng.integers(6, 30))
        K = int(rng.integers(1, 4))
        Y = rng.standard_normal((P, P - 1)) * np.linspace(2.0, 0.5, P - 1)
        C = Y @ Y.T
        V0 = np.linalg.qr(rng.standard_normal((P - 1, K)))[0]
        Vl, fl, itl, gl = fit_frame(Y, C, V0, 3000, 1e-8, 1e-14)
        Vc, fc, itc, gc = fit_frame(Y, C, V0, 3000, 1e-8, 1e-14, True)
        assert fl < center_cost(Y, C, V0) and fl == pytest.approx(center_cost(Y, C, Vl), rel=1e-14)
        assert gl < 1e-6
        np.testing.assert_allclose(Vl.T @ Vl, np.eye(K), atol=1e-12)
        same += abs(fl - fc) <= 1e-9 * fc
    assert same >= 7


def test_center_basis_applies_q_lazily_like_the_explicit_householder_q(rng):
    from geomprobe.mftma.centers import _sign_fixed_qr, center_basis

    for P, N, scale in ((12, 40, 1.0), (30, 20, 1.0), (10, 50, 1e-9)):
        C = rng.standard_normal((P, N))
        C[1] = C[0] + scale * rng.standard_normal(N)      # scale 1e-9: ill-conditioned, explicit Q path
        Y, Q, sv = center_basis(C)
        Xb = C - C.mean(axis=0)
        Qe = _sign_fixed_qr(Xb.T)[0][:, :Y.shape[1]]
        np.testing.assert_allclose(Y @ Qe.T, Xb, atol=1e-10 * np.abs(Xb).max())
        frame = np.linalg.qr(rng.standard_normal((Y.shape[1], 3)))[0]
        V = Q @ frame
        np.testing.assert_allclose(V, Qe @ frame, atol=1e-8)
        np.testing.assert_allclose(V.T @ V, np.eye(3), atol=1e-12)
