"""GLUE / GCMC (geomprobe.glue): kernel vs numpy twin, fast vs cvxpy, identity, Cover, simulation,
invariances, errors, rows."""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.optimize import nnls

import geomprobe.glue as glue_mod
from conftest import load_mftma_case
from geomprobe import InputError, glue_analysis
from geomprobe._kernels.glue import _chol_delete, anchor_products, joint_dual
from geomprobe.glue import _glue, glue_rows
from geomprobe.mftma import empirical_capacity
from geomprobe.registry import METRICS


@pytest.fixture
def rng():
    return np.random.default_rng(1234)


def _clouds(rng, P=6, M=8, N=30, spread=0.6):
    C = rng.standard_normal((P, N))
    return [C[i] + spread * rng.standard_normal((M, N)) for i in range(P)]


def _stack(Xs):
    X = np.concatenate(Xs)
    return X - X.mean(axis=0), np.array([x.shape[0] for x in Xs])


# --------------------------------------------------------------------------- kernel vs numpy twin

def _twin_dual(X, sgn, t):
    """Plain-numpy/scipy twin for kappa = 0: the dual is the NNLS min_{lam >= 0} ||A^T lam + t||,
    A = sgn * X (scipy's Lawson-Hanson)."""
    lam, _ = nnls((sgn[:, None] * X).T, -t, maxiter=100 * X.shape[0])
    return lam


@pytest.mark.parametrize("use_k", [True, False])
def test_joint_dual_matches_scipy_nnls_twin(rng, use_k):
    X, _ = _stack(_clouds(rng, P=7, M=6, N=25))
    pc = np.repeat(np.arange(7), 6)
    K = X @ X.T if use_k else np.empty((0, 0))
    for s in range(10):
        t = rng.standard_normal(X.shape[1])
        y = np.where(rng.permutation(7) < 3, 1.0, -1.0)
        sgn = y[pc]
        b = -sgn * (X @ t)
        lam = np.zeros(X.shape[0])
        status, res, rounds, nw = joint_dual(K, X, use_k, sgn, b, lam, 4, 10**5)
        assert status == 0 and res <= 1e-12 and rounds >= 1
        twin = _twin_dual(X, sgn, t)
        v_fast = t + (sgn * lam) @ X
        v_twin = t + (sgn * twin) @ X
        np.testing.assert_allclose(v_fast, v_twin, rtol=0, atol=1e-9 * np.linalg.norm(t))
        np.testing.assert_allclose(lam, twin, rtol=1e-7, atol=1e-9 * twin.max())
        # primal feasibility and complementary slackness of the returned dual
        marg = sgn * (X @ v_fast)
        assert marg.min() >= -1e-9 * np.linalg.norm(t) * np.abs(X).max()
        assert np.all(np.abs(marg[lam > 0]) <= 1e-8 * np.linalg.norm(t) * np.abs(X).max())


def test_joint_dual_zero_when_t_is_feasible(rng):
    X, _ = _stack(_clouds(rng, P=3, M=4, N=10))
    sgn = np.ones(X.shape[0])
    b = -np.abs(rng.standard_normal(X.shape[0]))   # every constraint already holds at v = t
    lam = np.ones(X.shape[0])
    status, res, rounds, nw = joint_dual(X @ X.T, X, True, sgn, b, lam, 4, 1000)
    assert status == 0 and rounds == 0 and not lam.any()


def test_chol_delete_matches_refactorisation(rng):
    # removing row/column q of G from its Cholesky factor == the Cholesky factor of the reduced G
    k = 9
    A = rng.standard_normal((k, 14))
    G = A @ A.T
    for q in range(k):
        L = np.zeros((k + 1, k + 1))
        L[:k, :k] = np.linalg.cholesky(G)
        _chol_delete(L, k, q)
        keep = np.delete(np.arange(k), q)
        np.testing.assert_allclose(L[:k - 1, :k - 1], np.linalg.cholesky(G[np.ix_(keep, keep)]), atol=1e-12)


def test_anchor_products_match_numpy_twin(rng):
    X = rng.standard_normal((20, 7))
    P = 4
    s0 = rng.standard_normal((P, 7))
    t = rng.standard_normal(7)
    supp = np.array([1, 2, 5, 9, 10, 11, 17])            # sorted support
    grp = np.array([0, 0, 1, 2, 2, 2, 3])                 # its anchored manifolds, in order
    wv = rng.uniform(0.1, 1.0, supp.size)
    GS, SH, St = np.full((P, P), np.nan), np.full((P, P), np.nan), np.full(P, np.nan)
    anchor_products(X @ X.T, supp, supp, grp, wv, X @ s0.T, X @ t, GS, SH, St)
    S = np.stack([(wv[grp == g, None] * X[supp[grp == g]]).sum(axis=0) for g in range(4)])   # twin
    np.testing.assert_allclose(GS, S @ S.T, rtol=1e-12)
    np.testing.assert_array_equal(GS, GS.T)
    np.testing.assert_allclose(SH, S @ s0.T, rtol=1e-12)
    np.testing.assert_allclose(St, S @ t, rtol=1e-12)
    # the Gram-free form: K of the support only, addressed by position
    GS2 = np.empty((P, P))
    anchor_products(X[supp] @ X[supp].T, np.arange(supp.size), supp, grp, wv, X @ s0.T, X @ t, GS2, SH, St)
    np.testing.assert_allclose(GS2, S @ S.T, rtol=1e-12)


# --------------------------------------------------------------------------- fidelity

@pytest.mark.parametrize("dich", ["random", "one_vs_rest"])
def test_fast_equals_cvxpy_and_identity(rng, dich):
    Xs = _clouds(rng)
    fast = glue_analysis(Xs, dichotomies=dich, n_t=12, seed=5)
    ref = glue_analysis(Xs, dichotomies=dich, n_t=12, seed=5, solver="cvxpy")
    for name in ("capacity", "radius", "dimension", "utility", "E_a", "E_b", "E_c"):
        assert getattr(fast, name) == pytest.approx(getattr(ref, name), rel=1e-8), name
    np.testing.assert_array_equal(fast.n_no_anchor, ref.n_no_anchor)
    assert fast.kkt_residual_max <= 1e-10 and fast.n_cvxpy_fallback == 0
    for r in (fast, ref):
        assert r.capacity == pytest.approx(r.utility * (1 + r.radius ** -2) / r.dimension, rel=1e-10)
        assert r.capacity == pytest.approx(r.P / r.E_a, rel=1e-14)
        assert r.E_c <= r.E_b + 1e-12 and np.all(r.c <= r.b + 1e-9)
        assert 0 <= r.center_alignment_abs <= 1 and abs(r.center_alignment) <= r.center_alignment_abs + 1e-15
        assert abs(r.axis_alignment) <= r.axis_alignment_abs + 1e-15 <= 1 + 1e-12
        assert np.all(r.manifold_radius > 0) and np.all(r.manifold_dimension > 0)


def test_gram_free_path_matches_gram_path(rng, monkeypatch):
    Xs = _clouds(rng, P=5, M=7, N=20)
    with_k = glue_analysis(Xs, n_t=10, seed=2)
    monkeypatch.setattr(glue_mod, "GRAM_MAX_BYTES", 0)
    without = glue_analysis(Xs, n_t=10, seed=2)
    assert any("point Gram" in n for n in without.notes)
    assert without.capacity == pytest.approx(with_k.capacity, rel=1e-10)
    assert without.radius == pytest.approx(with_k.radius, rel=1e-9)


def test_kkt_failures_are_resolved_by_cvxpy_and_counted(rng, monkeypatch):
    Xs = _clouds(rng, P=4, M=5, N=16)
    fast = glue_analysis(Xs, n_t=4, seed=9, kappa=0.05)
    ref = glue_analysis(Xs, n_t=4, seed=9, kappa=0.05, solver="cvxpy")
    assert fast.capacity == pytest.approx(ref.capacity, rel=1e-8)      # kappa > 0 too
    monkeypatch.setattr(glue_mod, "KKT_TOL", -1.0)                      # every sample "fails"
    redone = glue_analysis(Xs, n_t=4, seed=9, kappa=0.05)
    assert redone.n_cvxpy_fallback == 4 and any("4 of 4 samples re-solved by cvxpy" in n for n in redone.notes)
    assert redone.capacity == pytest.approx(ref.capacity, rel=1e-12)


def test_cover_limit_for_point_manifolds(rng):
    # P points in general position, random balanced labels, P/N = 1/4: E[a] = P/2 in the limit
    # (Cover / Gardner), so alpha -> 2. 3 standard errors of the sample mean of a.
    P, N, n_t = 40, 160, 300
    res = glue_analysis(rng.standard_normal((P, N)), np.arange(P), n_t=n_t, seed=3, center=False)
    se = res.a.std(ddof=1) / np.sqrt(n_t)
    assert abs(res.E_a - P / 2) <= 3 * se + 0.02 * P
    assert res.capacity == pytest.approx(2.0, rel=0.08)
    assert res.dimension == 0 and np.all(res.manifold_radius == 0)


@pytest.mark.parametrize("dich", ["random", "one_vs_rest"])
def test_capacity_matches_simulation_case_a(dich):
    # GLUE's E[a] is the statistical dimension of the separability cone; the simulated critical
    # dimension of a trial has mean E[a] + 1/2 (Cover's count: crit - 1 ~ Binomial(P - 1, 1/2) for
    # points). Same ensemble, hyperplane through the origin (bias=False), data centred in both.
    # n_t = 300 GLUE samples, n_rep = 200 simulated trials: the check is on the means within 3
    # combined standard errors, and on P / N_c (the bisection estimate) within 5 %.
    Xs = load_mftma_case("a_gauss_P10_M20_N100")
    g = glue_analysis(Xs, dichotomies=dich, n_t=300, seed=11)
    e = empirical_capacity(Xs, dichotomies=dich, n_rep=200, seed=12, bias=False)
    crit = e.critical_n.astype(float)
    se = np.hypot(g.a.std(ddof=1) / np.sqrt(g.a.size), crit.std(ddof=1) / np.sqrt(crit.size))
    assert abs(g.E_a - (crit.mean() - 0.5)) <= 3 * se
    assert g.capacity == pytest.approx(e.capacity, rel=0.05)


@pytest.mark.slow
@pytest.mark.parametrize("dich", ["random", "one_vs_rest"])
def test_capacity_matches_simulation_case_b(dich):
    Xs = load_mftma_case("b_gauss_P50_M50_N500")
    N = Xs[0].shape[1]
    g = glue_analysis(Xs, dichotomies=dich, n_t=200, seed=11)
    e = empirical_capacity(Xs, dichotomies=dich, n_rep=100, seed=12, bias=False)
    crit = e.critical_n.astype(float)
    se_a = g.a.std(ddof=1) / np.sqrt(g.a.size)
    if dich == "one_vs_rest":
        # through the origin, no trial is separable even in all N = 500 dimensions (critical n
        # censored at N + 1, measured 2026-11-27): the simulation only says "at the floor", and GLUE
        # must agree: E[a] at its bound N (a <= ||t||^2), capacity P / N
        assert np.all(crit == N + 1) and np.isnan(e.capacity)
        assert N - 3 * se_a - 0.02 * N <= g.E_a <= N + 3 * se_a
        assert g.capacity == pytest.approx(len(Xs) / N, rel=0.03)
        return
    se = np.hypot(se_a, crit.std(ddof=1) / np.sqrt(crit.size))
    assert abs(g.E_a - (crit.mean() - 0.5)) <= 3 * se
    assert g.capacity == pytest.approx(e.capacity, rel=0.05)


def test_separation_changes_capacity(rng):
    # moving the class centers apart (a transformation GLUE must detect) raises capacity and lowers R
    C = rng.standard_normal((6, 30))
    noise = [0.6 * rng.standard_normal((8, 30)) for _ in range(6)]
    near = glue_analysis([C[i] + noise[i] for i in range(6)], n_t=40, seed=0)
    far = glue_analysis([3 * C[i] + noise[i] for i in range(6)], n_t=40, seed=0)
    assert far.capacity > near.capacity and far.radius < near.radius


def test_fixed_dichotomy_is_used(rng):
    Xs = _clouds(rng, P=4)
    y = np.array([1, -1, -1, 1])
    r = glue_analysis(Xs, dichotomies=y, n_t=10, seed=0)
    assert r.dichotomies == "fixed"
    flipped = glue_analysis(Xs, dichotomies=-y, n_t=10, seed=0)
    # y -> -y with the same t is the same problem for -t: different per-sample values, same kind
    assert not np.allclose(r.a, flipped.a)


# --------------------------------------------------------------------------- invariances

_settings = settings(max_examples=8, deadline=None)


@_settings
@given(st.integers(0, 2**31 - 1), st.floats(1e-6, 1e6))
def test_invariant_to_rotation_scale_and_point_order(seed, scale):
    rng = np.random.default_rng(seed)
    Xs = _clouds(rng, P=4, M=5, N=12)
    X0, sizes = _stack(Xs)
    n_t = 6
    T = rng.standard_normal((n_t, 12))
    Y = np.array([np.where(rng.permutation(4) < 2, 1.0, -1.0) for _ in range(n_t)])
    base = _glue(X0, sizes, T, Y, 0.0, "random", "fast")
    Q, _ = np.linalg.qr(rng.standard_normal((12, 12)))
    rot = _glue(X0 @ Q, sizes, T @ Q, Y, 0.0, "random", "fast")          # rotate points and t together
    scaled = _glue(scale * X0, sizes, T, Y, 0.0, "random", "fast")
    perm = np.concatenate([o + rng.permutation(m) for o, m in zip(np.r_[0, np.cumsum(sizes)[:-1]], sizes)])
    within = _glue(X0[perm], sizes, T, Y, 0.0, "random", "fast")
    for other in (rot, scaled, within):
        for name in ("capacity", "radius", "dimension", "utility"):
            assert getattr(other, name) == pytest.approx(getattr(base, name), rel=1e-7), name
        np.testing.assert_allclose(other.manifold_radius, base.manifold_radius, rtol=1e-7)
        np.testing.assert_allclose(other.manifold_dimension, base.manifold_dimension, rtol=1e-6, atol=1e-9)


@_settings
@given(st.integers(0, 2**31 - 1))
def test_invariant_to_manifold_order_with_labels(seed):
    rng = np.random.default_rng(seed)
    Xs = _clouds(rng, P=5, M=4, N=14)
    y = np.array([1, -1, 1, -1, -1])
    p = rng.permutation(5)
    a = glue_analysis(Xs, dichotomies=y, n_t=6, seed=seed)
    b = glue_analysis([Xs[i] for i in p], dichotomies=y[p], n_t=6, seed=seed)
    for name in ("capacity", "radius", "dimension", "utility", "center_alignment", "axis_alignment_abs"):
        assert getattr(b, name) == pytest.approx(getattr(a, name), rel=1e-7), name
    np.testing.assert_allclose(b.manifold_radius, a.manifold_radius[p], rtol=1e-7)


# --------------------------------------------------------------------------- errors and rows

def test_errors(rng):
    X = rng.standard_normal((12, 5))
    y = np.repeat(np.arange(3), 4)
    with pytest.raises(InputError, match=r"dichotomies must be one of 'random', 'one_vs_rest'; got 'all'"):
        glue_analysis(X, y, dichotomies="all")
    with pytest.raises(InputError, match=r"array of P = 3 labels \+-1, got shape \(2,\)"):
        glue_analysis(X, y, dichotomies=[1, -1])
    with pytest.raises(InputError, match=r"dichotomies must hold only \+1 and -1, got 0"):
        glue_analysis(X, y, dichotomies=[1, 0, -1])
    with pytest.raises(InputError, match=r"n_t must be an integer >= 1, got 0"):
        glue_analysis(X, y, n_t=0)
    with pytest.raises(InputError, match=r"solver must be one of 'fast', 'cvxpy'; got 'osqp'"):
        glue_analysis(X, y, solver="osqp")
    with pytest.raises(InputError, match=r"kappa must be a finite number >= 0, got -1"):
        glue_analysis(X, y, kappa=-1)
    with pytest.raises(InputError, match=r"labels must contain at least 2 classes, got 1"):
        glue_analysis(X, np.zeros(12, int))
    with pytest.raises(InputError, match=r"GLUE needs at least 2 classes, labels contain 1"):
        glue_rows(X, np.zeros(12, int), rng)


def test_rows_are_registered_and_per_class(rng):
    X = np.concatenate(_clouds(rng, P=4, M=6, N=15))
    labels = np.repeat([3, 5, 7, 9], 6)
    rows, notes = glue_rows(X, labels, np.random.default_rng(0), n_t=8, per_class=5, max_classes=3)
    names = {m for m, _, _ in rows}
    assert names <= set(METRICS) and all(m.startswith("glue_") for m in names)
    per_class = {c for _, c, _ in rows if c is not None}
    assert len(per_class) == 3 and per_class <= {3, 5, 7, 9}
    assert any("3 of 4 classes" in n for n in notes) and any("subsampled to 5" in n for n in notes)
    cap = [v for m, c, v in rows if m == "glue_capacity"]
    assert len(cap) == 1 and cap[0] > 0
    again, _ = glue_rows(X, labels, np.random.default_rng(0), n_t=8, per_class=5, max_classes=3)
    assert again == rows
