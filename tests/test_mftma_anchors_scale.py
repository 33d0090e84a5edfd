"""Anchors at scale (issue 20 item 3) and the shared NNLS steps (_kernels/nnls.py, issue 15).

- every step of geomprobe._kernels.nnls against a plain-numpy twin;
- the anchor kernel (Gram formed once by BLAS, working set over the points) equals the previous
  kernel (git e52633f, scalar Gram loop) on recorded small random cases: per-manifold alpha, R, D to
  1e-9 relative and the same number of QPs. The cases and the previous kernel's outputs are in
  tests/data/mftma/anchors_previous_kernel.npz, written by anchors_previous_kernel_record.py (next
  to it) run against that revision;
- the kernel against a scipy NNLS twin with many more points than dimensions (m >> D + 1, where the
  Cholesky work array is smaller than m) and with duplicated points.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.optimize import nnls

from geomprobe._kernels import nnls as kn
from geomprobe._kernels.mftma_anchors import anchor_points_kernel, gram, manifold_metrics_gram
from geomprobe.mftma import anchor_points
from geomprobe.mftma.anchors import anchor_gram
from geomprobe.mftma.capacity import manifold_metrics

DATA = Path(__file__).parent / "data" / "mftma"


@pytest.fixture
def rng():
    return np.random.default_rng(2026)


# ---------------------------------------------------------------- numpy twins of the NNLS steps
def _factor(G, order):
    """Twin: L with L L^T = G[order][:, order] (numpy Cholesky)."""
    return np.linalg.cholesky(G[np.ix_(order, order)])


def _append_all(G, order, append):
    L = np.zeros((len(order) + 1, len(order) + 1))
    for k, j in enumerate(order):
        assert append(L, k, G[j, order[:k]].copy(), G[j, j])
    return L


@pytest.mark.parametrize("append", [kn.chol_append, kn.chol_append_rows])
def test_chol_append_builds_the_cholesky_factor_and_refuses_dependent_columns(rng, append):
    A = rng.standard_normal((12, 7))
    G = A.T @ A
    order = np.array([3, 0, 6, 1, 5])
    L = _append_all(G, order, append)
    np.testing.assert_allclose(np.tril(L[:5, :5]), _factor(G, order), rtol=1e-12, atol=1e-12)
    # a column in the span of the passive ones fails the pivot test and leaves L[k, k] alone
    a_dep = A[:, order] @ rng.standard_normal(5)
    grow = A[:, order].T @ a_dep
    L[5, 5] = -7.0
    assert not append(L, 5, grow, a_dep @ a_dep)
    assert L[5, 5] == -7.0
    # an independent one passes
    a_new = rng.standard_normal(12)
    assert append(L, 5, A[:, order].T @ a_new, a_new @ a_new)
    B = np.column_stack([A[:, order], a_new])
    np.testing.assert_allclose(np.tril(L) @ np.tril(L).T, B.T @ B, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("solve", [kn.chol_solve, kn.chol_solve_rows])
def test_chol_solve_matches_numpy_solve(rng, solve):
    A = rng.standard_normal((9, 6))
    G = A.T @ A
    L = np.zeros((8, 8))
    L[:6, :6] = np.linalg.cholesky(G)
    L[6:, :] = 99.0                        # rows beyond k must not be read
    rhs = np.concatenate([rng.standard_normal(6), [5.0, 5.0]])
    y = np.full(8, np.nan)
    solve(L, 6, rhs, y)
    np.testing.assert_allclose(y[:6], np.linalg.solve(G, rhs[:6]), rtol=1e-10)


@settings(deadline=None, max_examples=25)
@given(st.integers(3, 9), st.data())
def test_chol_delete_equals_the_factor_of_the_reduced_gram(k, data):
    q = data.draw(st.integers(0, k - 1))
    rng = np.random.default_rng(data.draw(st.integers(0, 2**31)))
    A = rng.standard_normal((k + 3, k))
    L = np.linalg.cholesky(A.T @ A).copy()
    kn.chol_delete(L, k, q)
    keep = [i for i in range(k) if i != q]
    Lr = np.linalg.cholesky(A[:, keep].T @ A[:, keep])
    # Givens downdate: the same factor up to rounding (positive diagonal)
    np.testing.assert_allclose(np.tril(L[:k - 1, :k - 1]), Lr, rtol=1e-9, atol=1e-10)


def _accept_or_step_twin(y, z, idx):
    """Twin of the Lawson-Hanson step: accept y if positive, else move to the first zero crossing."""
    z = z.copy()
    if np.all(y > 0):
        z[idx] = y
        return True, z
    neg = y <= 0
    steps = z[idx][neg] / (z[idx][neg] - y[neg])
    a = min(1.0, steps.min())
    z[idx] = z[idx] + a * (y - z[idx])
    if steps.min() < 1.0:
        z[idx[np.flatnonzero(neg)[np.argmin(steps)]]] = 0.0
    return False, z


def test_accept_or_step_and_drop_zeros_match_twin(rng):
    m = 10
    idx = np.array([7, 2, 5, 0], dtype=np.int64)
    for y in (np.array([0.5, 1.0, 2.0, 0.1]), np.array([0.5, -1.0, 2.0, -0.2])):
        z = np.zeros(m)
        z[idx] = [1.0, 0.3, 0.2, 0.4]
        ok_t, z_t = _accept_or_step_twin(y, z, idx)
        ok = kn.accept_or_step(y, z, idx, 4)
        assert ok == ok_t
        np.testing.assert_allclose(z, z_t, rtol=1e-14, atol=0)
    assert not ok and (z[idx] == 0).sum() == 1
    # drop_zeros removes exactly that column from the factor and the passive set
    A = rng.standard_normal((8, m))
    L = np.zeros((5, 5))
    L[:4, :4] = _factor(A.T @ A, idx)
    passive = np.zeros(m, np.bool_)
    passive[idx] = True
    excluded = np.ones(m, np.bool_)
    idx2 = idx.copy()
    k = kn.drop_zeros(L, 4, idx2, z, passive, excluded)
    kept = idx[z[idx] > 0]
    assert k == 3 and list(idx2[:k]) == list(kept) and not excluded.any()
    assert set(np.flatnonzero(passive)) == set(kept)
    np.testing.assert_allclose(np.tril(L[:3, :3]), _factor(A.T @ A, kept), rtol=1e-9, atol=1e-10)


# ---------------------------------------------------------------- the anchor kernel
def test_anchor_gram_is_the_exactly_symmetric_gram(rng):
    sD1 = np.vstack([rng.standard_normal((30, 45)), np.ones((1, 45))])
    G = anchor_gram(sD1)
    assert G.flags["C_CONTIGUOUS"] and np.array_equal(G, G.T)
    np.testing.assert_allclose(G, sD1.T @ sD1, rtol=1e-13, atol=1e-12)
    Gk = gram(sD1)
    assert np.array_equal(Gk, Gk.T)
    np.testing.assert_allclose(Gk, G, rtol=1e-13, atol=1e-12)


def test_anchor_kernel_equals_the_previous_kernel_on_recorded_cases():
    d = np.load(DATA / "anchors_previous_kernel.npz")
    n = len([k for k in d.files if k.startswith("out_")])
    assert n == 10
    worst = 0.0
    for c in range(n):
        sD1, T, kappa, prev = d[f"sD1_{c}"], d[f"T_{c}"], float(d[f"kappa_{c}"]), d[f"out_{c}"]
        m = sD1.shape[1]
        new = np.array(manifold_metrics(sD1, T, kappa, 50 * m + 1000), dtype=float)
        assert new[3] == prev[3] and new[4] == 0 == prev[4]            # same QP count, no failure
        # K fixed, same sD1 and t: alpha, R, D equal the previous kernel's to 1e-9 (issue 20)
        np.testing.assert_allclose(new[:3], prev[:3], rtol=1e-9, atol=1e-12, err_msg=f"case {c}")
        worst = max(worst, float(np.max(np.abs(new[:3] - prev[:3]) / np.abs(prev[:3]))))
    assert worst < 1e-9


def _scipy_twin(sD1, T, kappa):
    """alpha and anchors from one scipy.optimize.nnls per sample (dual of the anchor QP)."""
    d1, n_t = T.shape
    anchors = np.empty_like(T)
    for s in range(n_t):
        proj = sD1.T @ T[:, s]
        j = int(np.argmax(proj))
        anchors[:, s] = sD1[:, j]
        if proj[j] + kappa >= 0:
            tp = T[:, s].copy()
            tp[-1] += kappa
            z, _ = nnls(sD1, tp, maxiter=50 * sD1.shape[1])
            az = sD1 @ z
            if np.linalg.norm(az) >= 1e-8:
                anchors[:, s] = az / az[-1]
    ts = np.maximum((T * anchors).sum(0) + kappa, 0)
    return 1 / np.mean(ts ** 2 / (anchors ** 2).sum(0)), anchors


@pytest.mark.parametrize("m, D, dup, kappa", [(400, 12, False, 0.0), (300, 30, True, 0.2), (150, 140, False, 0.0)])
def test_working_set_kernel_matches_scipy_twin_with_many_points(rng, m, D, dup, kappa):
    S = rng.standard_normal((D, m)) * 0.7
    if dup:
        S[:, m // 2:] = S[:, : m - m // 2]
    sD1 = np.vstack([S, np.ones((1, m))])
    T = rng.standard_normal((D + 1, 30))
    alpha, R, Dm, anchors, is_qp, fails = anchor_points_kernel(sD1, anchor_gram(sD1), T, kappa, 50 * m + 1000)
    assert fails == 0 and is_qp.any()
    alpha_t, anchors_t = _scipy_twin(sD1, T, kappa)
    np.testing.assert_allclose(anchors, anchors_t, atol=1e-7)
    assert alpha == pytest.approx(alpha_t, rel=1e-7)
    # the public path gives the same numbers
    res = anchor_points(sD1, T, kappa)
    assert (res.alpha, res.radius, res.dimension) == (alpha, R, Dm)
    assert manifold_metrics_gram(sD1, anchor_gram(sD1), T, kappa, 50 * m + 1000)[:3] == (alpha, R, Dm)
