"""MFTMA center model: pymanopt replay (seed_mode="reference"), the default lowest-cost rule against a
brute-force many-restart fit, standard errors and stability on structured data (issue 20).

Structured generators (kept here): image-like pixel manifolds, correlated low-dimensional ellipsoids,
spheres whose centers form antipodal pairs (near-degenerate center geometry).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from geomprobe.mftma import manifold_analysis
from geomprobe.mftma.centers import (
    _sign_fixed_qr,
    center_basis,
    fit_center_model,
    welch_res_bound,
)
from geomprobe._kernels.mftma_centers import (
    _proj_stiefel,
    fit_and_score,
    fit_frame_pymanopt,
    residual_stats,
)

REPLAY = Path(__file__).parent / "data" / "mftma" / "pymanopt025_cg_replay.npz"


# ---------------------------------------------------------------- structured generators
def pixel_manifolds(seed=0, P=10, M=50, side=28):
    """Image-like classes: a smooth nonnegative prototype per class (4 Gaussian blobs on a side x side
    grid over a common background), each image shifted by up to 2 pixels, scaled in intensity by
    0.8-1.2 and noised (sd 0.05)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:side, 0:side]
    base = rng.uniform(0.2, 0.4)
    Xs = []
    for _ in range(P):
        proto = np.full((side, side), base)
        for _ in range(4):
            cy, cx = rng.uniform(6, side - 6, 2)
            s = rng.uniform(2, 5)
            proto += rng.uniform(0.5, 1.0) * np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * s * s))
        imgs = np.empty((M, side * side))
        for m in range(M):
            dy, dx = rng.integers(-2, 3, 2)
            im = np.roll(np.roll(proto, dy, 0), dx, 1) * rng.uniform(0.8, 1.2)
            imgs[m] = (im + 0.05 * rng.standard_normal(im.shape)).ravel()
        Xs.append(imgs)
    return Xs


def correlated_ellipsoids(seed=0, P=30, M=40, N=200, rank=3, dim=5):
    """Ellipsoids of intrinsic dimension `dim` (axes 3 ... 1) whose centers share `rank` strong
    directions plus isotropic noise of sd 0.3 per feature."""
    rng = np.random.default_rng(seed)
    A = rng.standard_normal((rank, N))
    Xs = []
    for _ in range(P):
        c = rng.standard_normal(rank) @ A + 0.3 * rng.standard_normal(N)
        axes = np.linalg.qr(rng.standard_normal((N, dim)))[0] * np.linspace(1.5, 0.5, dim) * 2
        z = rng.standard_normal((M, dim))
        z /= np.linalg.norm(z, axis=1, keepdims=True)
        Xs.append(c + z @ axes.T)
    return Xs


def antipodal_spheres(seed=0, P=20, M=30, N=100, dim=5):
    """P unit spheres of intrinsic dimension `dim` whose centers form antipodal pairs (c, -c)."""
    rng = np.random.default_rng(seed)
    half = rng.standard_normal((P // 2, N)) / np.sqrt(N) * 3
    Xs = []
    for c in np.concatenate([half, -half]):
        B = np.linalg.qr(rng.standard_normal((N, dim)))[0]
        z = rng.standard_normal((M, dim))
        z /= np.linalg.norm(z, axis=1, keepdims=True)
        Xs.append(c + z @ B.T)
    return Xs


def _labels(Xs):
    return np.concatenate(Xs), np.repeat(np.arange(len(Xs)), [len(x) for x in Xs])


def _centers(Xs):
    return np.stack([x.mean(axis=0) for x in Xs])


# ---------------------------------------------------------------- seed_mode="reference": pymanopt replay
@pytest.mark.parametrize("name", ["a", "antipodal"])
def test_reference_optimiser_replays_recorded_pymanopt_fits(name):
    """Recorded by bench/mftma_pymanopt_replay.py with pymanopt 0.2.5's ConjugateGradient (defaults,
    maxiter 1000 and 15) from recorded Stiefel starts. Short trajectories and converged fits must be
    reproduced to rounding; fits that never converge (antipodal K >= 2 stop at the iteration cap) only
    share their iteration count, as rounding decides where they wander."""
    d = np.load(REPLAY)
    Y = d[f"Y_{name}"]
    C = Y @ Y.T
    n_checked = 0
    for K in (1, 2, 3):
        for i in range(3):
            for maxiter in (1000, 15):
                key = f"{name}_K{K}_s{i}_it{maxiter}"
                V, f, it, gn = fit_frame_pymanopt(Y, C, d[f"V0_{key}"], maxiter, 1e-6, 1e-10)
                rec_it = int(d[f"iters_{key}"])
                if maxiter == 15:
                    assert it == rec_it == 14
                    np.testing.assert_allclose(V, d[f"V_{key}"], atol=1e-11)
                    assert f == pytest.approx(float(d[f"f_{key}"]), rel=1e-13)
                    n_checked += 1
                elif rec_it < 999 and name == "a":
                    # converged (gradient norm < 1e-6): same minimum
                    assert f == pytest.approx(float(d[f"f_{key}"]), rel=1e-11)
                    assert np.abs(V - d[f"V_{key}"]).max() < 1e-5
                    n_checked += 1
                elif rec_it == 999:
                    assert it == 999
    assert n_checked >= 9


def test_stiefel_projection_is_pymanopts_not_the_horizontal_projection(rng):
    """pymanopt's proj/transport U - V sym(V^T U) differs from (I - V V^T) U for K >= 2 (issue 20)."""
    V = np.ascontiguousarray(np.linalg.qr(rng.standard_normal((9, 3)))[0])
    U = rng.standard_normal((9, 3))
    A = V.T @ U
    np.testing.assert_allclose(_proj_stiefel(V, U), U - V @ (0.5 * (A + A.T)), atol=1e-14)
    assert np.abs(_proj_stiefel(V, U) - (U - V @ A)).max() > 1e-2
    v = np.ascontiguousarray(V[:, :1])
    np.testing.assert_allclose(_proj_stiefel(v, np.ascontiguousarray(U[:, :1])), U[:, :1] - v @ (v.T @ U[:, :1]), atol=1e-14)


def test_reference_mode_starts_still_match_the_old_draws():
    """seed_mode="reference": the draws per K and rep are unchanged (randn(P,1) then randn(n,K))."""
    Xs = correlated_ellipsoids(1, P=8, M=5, N=20)
    C = _centers(Xs)
    a = fit_center_model(C, np.random.RandomState(3), n_reps=2)
    b = fit_center_model(C, np.random.RandomState(3), n_reps=2)
    assert a.K == b.K and np.array_equal(a.V11, b.V11)
    assert a.n_fits == 2 * len(a.res_coeff)


# ---------------------------------------------------------------- default rule vs brute force
def _brute_force(C, n_starts=30, seed=99):
    """Lowest-cost converged fit per K over many random starts, K = argmin res_coeff (no early stop)."""
    Y, _, _ = center_basis(C)
    G = Y @ Y.T
    P, n = Y.shape
    r = np.random.default_rng(seed)
    res = []
    for k in range(1, min(n, 4)):
        best = (np.inf, None)
        for _ in range(n_starts):
            V0 = _sign_fixed_qr(Y.T @ r.standard_normal((P, k)))[0]
            V, f, it, rc, st = fit_and_score(Y, G, V0, 3000, 1e-8, 1e-14, False)
            if np.isfinite(f) and f < best[0]:
                best = (f, V)
        res.append(residual_stats(Y, G, best[1])[0])
    return int(np.argmin(res)) + 1, np.array(res)


@pytest.mark.parametrize("gen,kw", [
    pytest.param(correlated_ellipsoids, dict(P=12, M=4, N=40, rank=2), marks=pytest.mark.slow),
    # 160 s under load ~20 on 2 cores: slow as well
    pytest.param(pixel_manifolds, dict(P=8, M=3, side=12), marks=pytest.mark.slow)])
def test_default_rule_matches_brute_force_many_restarts(gen, kw):
    C = _centers(gen(5, **kw))
    K_bf, res_bf = _brute_force(C)
    for seed in range(2):
        cm = fit_center_model(C, np.random.default_rng(seed))
        assert cm.K == K_bf
        # up to the selected K the lowest-cost minima agree (above it, rarely found minima of larger
        # K may differ without changing the selection)
        np.testing.assert_allclose(cm.res_coeff[:K_bf], res_bf[:K_bf], rtol=1e-5)
        assert np.all(cm.res_coeff[K_bf:len(res_bf)] > res_bf[K_bf - 1])
        assert cm.confirmed[cm.K - 1]


def test_welch_bound_is_a_lower_bound_on_res_coeff(rng):
    for P, dim in ((10, 3), (30, 5), (12, 11)):
        U = rng.standard_normal((P, dim))
        U /= np.linalg.norm(U, axis=1, keepdims=True)
        cos = np.abs(U @ U.T)[~np.eye(P, dtype=bool)]
        assert cos.mean() >= welch_res_bound(P, dim) - 1e-12
    assert welch_res_bound(10, 12) == 0.0 and welch_res_bound(10, 0) == np.inf


def test_default_rule_never_keeps_an_aborted_fit():
    """Every kept frame is a converged stationary point (gradient norm small), unlike the aborted fits
    (gradient norm 1e-1 to 1e2) that the stability rule can keep."""
    from geomprobe.mftma.centers import CONV_SLACK, _grad_norm
    C = _centers(correlated_ellipsoids(2, P=20, M=4, N=30, rank=4))
    cm = fit_center_model(C, np.random.default_rng(0))
    Y, _, _ = center_basis(C)
    for k in range(1, len(cm.res_coeff) + 1):
        if cm.confirmed[k - 1]:
            assert np.isfinite(cm.cost[k - 1])
    # the selected frame in center coordinates: Y = Xb Qf (sign-fixed thin QR of Xb^T = Qf R)
    Xb = C - C.mean(axis=0)
    Qf, R = np.linalg.qr(Xb.T)
    Qf = Qf * np.where(np.diag(R) < 0, -1.0, 1.0)
    Vy = Qf[:, :Y.shape[1]].T @ cm.V11
    np.testing.assert_allclose(Xb @ Qf[:, :Y.shape[1]], Y, atol=1e-10)
    assert _grad_norm(Y, Y @ Y.T, Vy) <= CONV_SLACK * 1e-6


# ---------------------------------------------------------------- stability and near-degenerate geometry
@pytest.mark.parametrize("gen,kw", [(pixel_manifolds, dict(P=10, M=6)),
                                    (correlated_ellipsoids, dict(P=30, M=4, N=200))])
def test_default_rule_same_K_and_frame_over_seeds_on_structured_centers(gen, kw):
    """The lowest-cost rule gives one K and one frame for every seed (the original's stability rule
    did not: issue 20), with the selected K's minimum confirmed by a second restart."""
    C = _centers(gen(0, **kw))
    cms = [fit_center_model(C, np.random.default_rng(s)) for s in range(10)]
    assert len({cm.K for cm in cms}) == 1
    # the lowest-cost minimum is reached twice (confirmed) for most seeds; where a seed's restarts
    # reach it once, the note says so, but the frame is the same
    assert sum(bool(cm.confirmed[cm.K - 1]) for cm in cms) >= 8
    for cm in cms:
        assert np.linalg.svd(cms[0].V11.T @ cm.V11, compute_uv=False).min() > 1 - 1e-8
        np.testing.assert_allclose(cm.res_coeff[cm.K - 1], cms[0].res_coeff[cm.K - 1], rtol=1e-7)


def test_near_degenerate_centers_are_named_with_alternative_center_models():
    C = _centers(antipodal_spheres(0, P=12, M=15, N=40))
    cm = fit_center_model(C, np.random.default_rng(0), n_reps=4)
    assert cm.degenerate and len(cm.alternatives) >= 1
    assert any(n.startswith("near-degenerate center geometry") for n in cm.notes)
    for k_alt, V_alt in cm.alternatives:
        assert V_alt.shape == (C.shape[1], k_alt)
        np.testing.assert_allclose(V_alt.T @ V_alt, np.eye(k_alt), atol=1e-10)


def test_default_rule_fit_count_is_bounded_and_does_not_depend_on_threads():
    """Fits per K: loose scan fits plus at most n_max full fits per candidate; the thread count only
    changes who runs a fit, not which fits run."""
    C = _centers(correlated_ellipsoids(4, P=60, M=3, N=80))
    a = fit_center_model(C, np.random.default_rng(1), n_threads=1)
    b = fit_center_model(C, np.random.default_rng(1), n_threads=2)
    assert a.K == b.K and np.array_equal(a.V11, b.V11) and a.n_fits == b.n_fits
    assert np.all(a.fits_per_K <= 10 + 1)
