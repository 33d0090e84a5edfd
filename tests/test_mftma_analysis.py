"""manifold_analysis against the reference results, edge cases, properties and error messages.

Reference numbers: tests/data/mftma/*.json (PROVENANCE.md); case b from ../shared/reference/mftma
when present.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from geomprobe import AnalysisError, InputError
from geomprobe.mftma import ball_capacity, manifold_analysis, mftma_rows
from conftest import load_mftma_case

DATA = Path(__file__).parent / "data" / "mftma"
N_SEEDS = 5


@pytest.fixture
def rng():
    return np.random.default_rng(2024)


def _load_case(case: str):
    Xs = load_mftma_case(case)
    refs = [json.loads((DATA / f"{case}__seed{s}.json").read_text()) for s in range(3)]
    return Xs, refs


# Capacity tolerance. The reference's three seeds agree unusually well on case a (std 0.0005, 0.15 %),
# but its per-manifold alphas vary by 7 % between seeds, so the aggregate's true seed-to-seed spread is
# about 2 %; averaging the reference's own seed-0 manifolds (kernel file) over 8000 fresh t-vectors
# gives 0.330, below its reported 0.335. We compare the mean of N_SEEDS runs with the reference mean
# within max(3 reference std, 1 %) for R and D and max(3 reference std, 3 %) for the capacity.
@pytest.mark.parametrize("case", ["a_gauss_P10_M20_N100", "e1_M1_P20_N50", "e2_dup_P20_M20_N100",
                                  "b_gauss_P50_M50_N500", "e3_NltM_P20_M50_N30"])
def test_full_analysis_matches_reference(case):
    Xs, refs = _load_case(case)
    # e3: K differs between the reference's own seeds (5, 4, 4): compare with K fixed to 4
    K = 4 if case.startswith("e3") else None
    # case b: 3 reference std is 4.6 % of the capacity and our seed spread ~1 %: 2 seeds keep it fast
    runs = [manifold_analysis(Xs, seed=s, K=K, seed_mode="spawn")
            for s in range(2 if case.startswith("b_") else N_SEEDS)]
    for r in runs:
        # rho_c is deterministic: the reference's value to 1e-6
        assert r.center_correlation == pytest.approx(refs[0]["rho_center"], abs=1e-6)
        if K is None:
            assert r.K == refs[0]["K"]
    for key, rkey, floor in (("capacity", "alpha_inv_mean", 0.03), ("radius", "R_mean", 0.01),
                             ("dimension", "D_mean", 0.01)):
        ref = np.array([x[rkey] for x in refs])
        ours = np.mean([getattr(r, key) for r in runs])
        tol = max(3 * ref.std(ddof=1), floor * abs(ref.mean()), 1e-12)
        assert abs(ours - ref.mean()) <= tol, (key, ours, ref.mean(), tol)


def test_point_manifolds_capacity_two_zero_radius_dimension():
    Xs, _ = _load_case("e1_M1_P20_N50")
    r = manifold_analysis(Xs, seed=0, n_t=2000)
    assert np.all(r.class_radius == 0) and np.all(r.class_dimension == 0)
    assert r.capacity == pytest.approx(2.0, rel=0.05)
    assert np.all(r.class_D == 1)


def _gauss(rng, P, M, N, spread=1.0):
    c = rng.standard_normal((P, N)) / np.sqrt(N)
    X = c[:, None, :] + spread * rng.standard_normal((P, M, N)) / np.sqrt(N)
    return X.reshape(P * M, N), np.repeat(np.arange(P), M)


@pytest.mark.parametrize("P", [2, 3, 5])
def test_few_classes_work(rng, P):
    X, y = _gauss(rng, P, 8, 20)
    r = manifold_analysis(X, y, seed=1, n_t=50, n_reps=3)
    assert r.max_K <= P - 1
    assert np.isfinite(r.capacity) and r.capacity > 0
    assert len(r.class_capacity) == P
    if P == 2:
        assert r.K == 0
        assert any("removes every center direction" in n for n in r.notes)


def test_duplicates_and_fewer_features_than_points(rng):
    X, y = _gauss(rng, 6, 10, 40)
    Xd = np.concatenate([X, X])
    yd = np.concatenate([y, y])
    r = manifold_analysis(Xd, yd, seed=0, n_t=80, n_reps=3)
    assert np.all(r.class_D == 20) and np.all(np.isfinite(r.class_capacity))
    X2, y2 = _gauss(rng, 6, 30, 12)
    r2 = manifold_analysis(X2, y2, seed=0, n_t=80, n_reps=3)
    assert np.all(r2.class_D == 12)
    assert np.all((r2.class_dimension >= 0) & (r2.class_dimension <= r2.class_D))


def test_kappa_lowers_capacity(rng):
    X, y = _gauss(rng, 6, 10, 40)
    a0 = manifold_analysis(X, y, seed=0, n_t=100, n_reps=3)
    a1 = manifold_analysis(X, y, seed=0, n_t=100, n_reps=3, kappa=0.5)
    assert a1.capacity < a0.capacity
    assert a1.kappa == 0.5


def test_same_seed_same_numbers_and_list_input(rng):
    X, y = _gauss(rng, 5, 7, 15)
    a = manifold_analysis(X, y, seed=3, n_t=40, n_reps=3)
    b = manifold_analysis([X[y == c] for c in range(5)], seed=np.random.default_rng(3), n_t=40, n_reps=3)
    np.testing.assert_array_equal(a.class_capacity, b.class_capacity)
    assert a.capacity == b.capacity and a.K == b.K
    X32 = manifold_analysis(X.astype(np.float32), y, seed=3, n_t=40, n_reps=3)
    assert np.isfinite(X32.capacity)


def test_fixed_K_and_ball_capacity(rng):
    X, y = _gauss(rng, 6, 8, 30)
    r = manifold_analysis(X, y, seed=0, n_t=50, n_reps=2, K=2)
    assert r.K == 2
    assert ball_capacity(0.0, 0.0) == pytest.approx(2.0)
    # Gardner: 1 / int_{-inf}^{kappa} (kappa - t)^2 Dt
    from scipy.integrate import quad
    from scipy.stats import norm
    for R, D, k in ((0.5, 4.0, 0.0), (1.2, 10.0, 0.3), (0.0, 0.0, 1.0)):
        a = k + R * np.sqrt(D)
        integral = quad(lambda t: (a - t) ** 2 * norm.pdf(t), -np.inf, a)[0]
        assert ball_capacity(R, D, k) == pytest.approx((1 + R * R) / integral, rel=1e-8)
    np.testing.assert_allclose(ball_capacity(np.array([0.0, 1.0]), np.array([0.0, 3.0])),
                               [2.0, ball_capacity(1.0, 3.0)])


# ---------------------------------------------------------------- properties (hypothesis)
_SETTINGS = settings(deadline=None, max_examples=8, suppress_health_check=[HealthCheck.too_slow])


def _small(seed):
    r = np.random.default_rng(seed)
    X, y = _gauss(r, 4, 5, 9, spread=0.5)
    return X, y, r


# The anchors are computed in a canonical basis and point order with one seeded stream per manifold
# (canonical manifold order), so with K fixed (no center-model fit) the invariances hold to rounding:
# rtol 1e-8. The center model (K = None) is a non-convex fit whose minima can sit at the boundary
# (a center removed entirely) for small P, where the iterate at which CG stops depends on rounding
# (radius 1.2 vs 10 observed for P = 4 under a rescaling): there only rho_c and K are compared.
def _same(a, b, rtol=1e-8):
    np.testing.assert_allclose([a.capacity, a.radius, a.dimension, a.center_correlation],
                               [b.capacity, b.radius, b.dimension, b.center_correlation], rtol=rtol, atol=1e-9)
    assert a.K == b.K


def _same_auto(X1, y1, X2, y2):
    a = manifold_analysis(X1, y1, **_KW_AUTO)
    b = manifold_analysis(X2, y2, **_KW_AUTO)
    assert a.center_correlation == pytest.approx(b.center_correlation, rel=1e-9)
    assert a.K == b.K


_KW = dict(n_t=30, n_reps=2, seed=7, K=0)
_KW_AUTO = dict(n_t=30, n_reps=2, seed=7)


@_SETTINGS
@given(st.integers(0, 10_000))
def test_invariant_to_feature_rotation(seed):
    X, y, r = _small(seed)
    O = np.linalg.qr(r.standard_normal((X.shape[1], X.shape[1])))[0]
    _same(manifold_analysis(X, y, **_KW), manifold_analysis(X @ O, y, **_KW))
    _same_auto(X, y, X @ O, y)


@_SETTINGS
@given(st.integers(0, 10_000))
def test_invariant_to_example_and_class_id_permutation(seed):
    X, y, r = _small(seed)
    base = manifold_analysis(X, y, **_KW)
    perm = r.permutation(len(y))
    _same(base, manifold_analysis(X[perm], y[perm], **_KW))
    _same_auto(X, y, X[perm], y[perm])
    relabel = r.permutation(4) * 3 + 10        # new, permuted class ids
    other = manifold_analysis(X, relabel[y], **_KW)
    _same(base, other)
    order = np.argsort(relabel)                 # class i of base is class relabel[i] of other
    np.testing.assert_allclose(other.class_capacity, base.class_capacity[order], rtol=1e-8)
    _same_auto(X, y, X, relabel[y])


@_SETTINGS
@given(st.integers(0, 10_000), st.floats(0.05, 20.0))
def test_invariant_to_common_positive_scale(seed, scale):
    X, y, _ = _small(seed)
    _same(manifold_analysis(X, y, **_KW), manifold_analysis(X * scale, y, **_KW))
    _same_auto(X, y, X * scale, y)


@_SETTINGS
@given(st.integers(0, 10_000))
def test_bounds(seed):
    X, y, _ = _small(seed)
    r = manifold_analysis(X, y, **_KW_AUTO)
    assert r.capacity > 0 and np.all(r.class_capacity > 0)
    assert r.radius >= 0 and np.all(r.class_radius >= 0)
    assert np.all((r.class_dimension >= 0) & (r.class_dimension <= r.class_D))
    assert 0 <= r.center_correlation <= 1


@_SETTINGS
@given(st.integers(0, 10_000))
def test_translating_one_class_changes_result_global_translation_does_not(seed):
    X, y, r = _small(seed)
    base = manifold_analysis(X, y, **_KW)
    v = r.standard_normal(X.shape[1])
    # a global translation is removed with the pooled mean (spec step 1): invariant
    _same(base, manifold_analysis(X + v, y, **_KW))
    X2 = X.copy()
    X2[y == 0] += 2.0 * v / np.linalg.norm(v)
    moved = manifold_analysis(X2, y, **_KW)
    assert abs(moved.capacity - base.capacity) > 1e-6 * base.capacity


# ---------------------------------------------------------------- errors and rows
def test_errors(rng):
    X, y = _gauss(rng, 3, 4, 6)
    with pytest.raises(InputError, match=r"labels must contain at least 2 classes, got 1 \(0\)"):
        manifold_analysis(X, np.zeros(len(y), int))
    with pytest.raises(InputError, match=r"labels has 11 entries but X has 12 rows"):
        manifold_analysis(X, y[:-1])
    with pytest.raises(InputError, match=r"labels is required when X is a 2-D array"):
        manifold_analysis(X)
    with pytest.raises(InputError, match=r"labels must be None when X is a list of per-class arrays"):
        manifold_analysis([X[:4], X[4:]], y)
    with pytest.raises(InputError, match=r"X must hold at least 2 classes, got 1"):
        manifold_analysis([X])
    with pytest.raises(InputError, match=r"X\[1\] has 5 features but X\[0\] has 6"):
        manifold_analysis([X[:4], X[4:8, :5]])
    with pytest.raises(InputError, match=r"n_t must be an integer >= 1, got 0"):
        manifold_analysis(X, y, n_t=0)
    with pytest.raises(InputError, match=r"n_reps must be an integer >= 1, got 1.5"):
        manifold_analysis(X, y, n_reps=1.5)
    with pytest.raises(InputError, match=r"kappa must be a finite number >= 0, got -0.1"):
        manifold_analysis(X, y, kappa=-0.1)
    with pytest.raises(InputError, match=r"solver must be one of 'fast', 'cvxpy'; got 'x'"):
        manifold_analysis(X, y, solver="x")
    with pytest.raises(InputError, match=r"K must be an integer >= 0, got -1"):
        manifold_analysis(X, y, K=-1)
    with pytest.raises(InputError, match=r"K must be between 0 and 2 \(P = 3 classes, N = 6 features\), got 3"):
        manifold_analysis(X, y, K=3)
    with pytest.raises(AnalysisError, match=r"K = 2 is not usable for these centers"):
        manifold_analysis(X, y, K=2, n_t=5, n_reps=1)
    with pytest.raises(InputError, match=r"seed must be >= 0, got -3"):
        manifold_analysis(X, y, seed=-3)
    Xc = X.copy()
    Xc[y == 2] = Xc[y == 2] - Xc[y == 2].mean(0) + (Xc[y == 0].mean(0) + Xc[y == 1].mean(0)) / 2
    with pytest.raises(InputError, match=r"class centers must differ from the mean of all class centers; "
                                         r"manifold \d has a mean-subtracted center of norm"):
        manifold_analysis(Xc, y, n_t=5, n_reps=1)
    with pytest.raises(InputError, match=r"X contains 1 non-finite value"):
        Xn = X.copy()
        Xn[0, 0] = np.nan
        manifold_analysis(Xn, y)


def test_cvxpy_solver_path_end_to_end(rng):
    X, y = _gauss(rng, 4, 5, 12)
    a = manifold_analysis(X, y, seed=0, n_t=25, n_reps=2)
    b = manifold_analysis(X, y, seed=0, n_t=25, n_reps=2, solver="cvxpy")
    assert b.solver == "cvxpy" and b.n_qp == a.n_qp
    np.testing.assert_allclose(b.class_capacity, a.class_capacity, rtol=1e-7)


def test_mftma_rows(rng):
    X, y = _gauss(rng, 6, 12, 30)
    X = np.concatenate([X, rng.standard_normal((1, 30))])
    y = np.concatenate([y, [9]])                 # a class of size 1: kept as a point manifold
    rows, notes = mftma_rows(X, y, np.random.default_rng(0), per_class=10, max_classes=5, n_t=40, n_reps=2,
                             empirical=True)
    names = [(m, c) for m, c, _ in rows]
    for m in ("capacity", "radius", "dimension", "center_correlation", "K", "empirical_capacity", "empirical_Nc"):
        assert (m, None) in names
    class_ids = {c for m, c, _ in rows if c is not None}
    assert len(class_ids) == 5
    assert any("5 of 7 classes chosen at random" in n for n in notes)
    rows2, notes2 = mftma_rows(X, y, np.random.default_rng(0), per_class=10, max_classes=5, n_t=40, n_reps=2,
                               empirical=True)
    assert rows2 == rows or all(
        (a[0], a[1]) == (b[0], b[1]) and (a[2] == b[2] or (np.isnan(a[2]) and np.isnan(b[2])))
        for a, b in zip(rows, rows2))
    r_all, n_all = mftma_rows(X, y, np.random.default_rng(1), per_class=None, n_t=20, n_reps=2)
    assert any("single example analysed as point manifolds" in n for n in n_all)
    with pytest.raises(InputError, match=r"MFTMA needs at least 2 classes, labels contain 1"):
        mftma_rows(X, np.zeros(len(X), int), np.random.default_rng(0))
    with pytest.raises(InputError, match=r"per_class must be an integer >= 1, got 0"):
        mftma_rows(X, y, np.random.default_rng(0), per_class=0)
    with pytest.raises(InputError, match=r"max_classes must be an integer >= 2, got 1"):
        mftma_rows(X, y, np.random.default_rng(0), max_classes=1)


def test_cvxpy_path_solves_every_qp_of_small_rank_deficient_manifolds():
    # Clarabel warm-started from the previous sample's solution failed on samples of these 10-point
    # manifolds (centred: rank 9 constraint matrices); the cvxpy path now solves each QP cold
    rng = np.random.default_rng(0)
    X = rng.standard_normal((60, 30))
    y = np.repeat(np.arange(6), 10)
    fast = manifold_analysis(X, y, seed=1, n_t=20, n_reps=2)
    ref = manifold_analysis(X, y, seed=1, n_t=20, n_reps=2, solver="cvxpy")
    # both runs share the center model (same seed); the anchors differ by Clarabel's accuracy at its
    # 1e-12 tolerances: radius 1.75e-8 relative with the issue-20 center model's frame (was < 1e-8)
    assert ref.capacity == pytest.approx(fast.capacity, rel=1e-7)
    assert ref.radius == pytest.approx(fast.radius, rel=1e-7)
    assert ref.dimension == pytest.approx(fast.dimension, rel=1e-7)
    # every QP is solved (none raises); Clarabel needs its default tolerances for a few of these
    # samples depending on the frame (0 of 120 with the pre-issue-20 frame, 1 with the lowest-cost
    # rule's, 2 with K = 0): such re-solves must be counted in the notes, and the results still agree
    relaxed = [n for n in ref.notes if "default tolerances" in n]
    assert len(relaxed) <= 1 and all(n.split(" of ")[0].isdigit() and int(n.split(" of ")[0]) <= 2 for n in relaxed)
