"""manifold_analysis: MFTMA capacity, radius, dimension, center correlation (spec sections 1-4)."""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numbers

import numpy as np
import scipy.linalg
from scipy.special import ndtr

from .._kernels.mftma_anchors import anchor_metrics, manifold_metrics_gram
from .._validation import (
    AnalysisError,
    InputError,
    check_choice,
    check_nonneg_float,
    check_positive_int,
    check_seed,
)
from ..local_runner import available_cores
from ._data import Manifolds, as_manifolds, blas_threads, n_workers
from .anchors import SOLVERS, anchor_gram, cvxpy_anchors, nnls_max_iter
from .centers import fit_center_model, qr_signs


@dataclass(frozen=True)
class ManifoldAnalysisResult:
    """Result of :func:`manifold_analysis`.

    Aggregates: ``capacity`` = 1 / mean_i(1/alpha_i) (the reference's reported alpha_M), ``radius`` =
    mean R_i, ``dimension`` = mean D_i, ``center_correlation`` = rho_c, ``K`` = shared center
    directions removed. Per class (in ``classes`` order): ``class_capacity``, ``class_radius``,
    ``class_dimension``, ``class_sizes`` (points), ``class_D`` (dimension D of the prepared manifold).
    Diagnostics: ``res_coeff`` (residual center correlation for K = 1, 2, ... as tried; NaN = invalid
    K), ``max_K`` (after the clamp), ``n_qp`` (QPs solved), ``n_samples`` (P * n_t), ``solver``,
    ``notes`` (what was clamped or skipped, and why).
    """
    capacity: float
    radius: float
    dimension: float
    center_correlation: float
    K: int
    classes: np.ndarray
    class_capacity: np.ndarray
    class_radius: np.ndarray
    class_dimension: np.ndarray
    class_sizes: np.ndarray
    class_D: np.ndarray
    res_coeff: np.ndarray
    max_K: int
    n_qp: int
    n_samples: int
    solver: str
    kappa: float
    n_t: int
    n_reps: int
    notes: tuple[str, ...] = field(default_factory=tuple)


def ball_capacity(R, D, kappa: float = 0.0):
    """Capacity of D-dimensional balls of radius R (Chung et al. 2016; spec section 4, end).

    alpha_Ball = (1 + R^2) / int_{-inf}^{a} Dt (a - t)^2  with  a = kappa + R sqrt(D);
    the integral is (a^2 + 1) Phi(a) + a phi(a). R = D = 0 gives Gardner's 1 / int_{-inf}^{kappa}.
    Accepts scalars or broadcastable arrays.
    """
    R = np.asarray(R, dtype=float)
    D = np.asarray(D, dtype=float)
    kappa = check_nonneg_float(kappa, "kappa")
    if np.any(~np.isfinite(R)) or np.any(R < 0):
        raise InputError(f"R must be finite and >= 0, got {R}")
    if np.any(~np.isfinite(D)) or np.any(D < 0):
        raise InputError(f"D must be finite and >= 0, got {D}")
    a = kappa + R * np.sqrt(D)
    integral = (a * a + 1.0) * ndtr(a) + a * np.exp(-0.5 * a * a) / np.sqrt(2.0 * np.pi)
    out = (1.0 + R * R) / integral
    return float(out) if out.ndim == 0 else out


#: A Cholesky pivot of the Gram matrix below this fraction of its diagonal entry (other than the last
#: one, which is ~0 because the points are centred) sends _prepare_one back to the QR of S^T.
CHOL_MIN_PIVOT = 1e-8


def _chol_r(G: np.ndarray) -> np.ndarray | None:
    """Upper R with R^T R = G (m x m, positive semi-definite of rank m-1 with a ~0 last pivot), i.e. the
    sign-fixed R of the QR of any S^T with S S^T = G, up to rounding. The last pivot is set to 0 (the
    points are centred: the last point is minus the sum of the others, so the QR gives ~0 there).
    None when some other pivot is below CHOL_MIN_PIVOT of its diagonal entry (caller falls back to QR)."""
    m = G.shape[0]
    dg = np.diag(G).copy()
    R = np.zeros((m, m))
    if m > 1:
        try:
            L = np.linalg.cholesky(G[:m - 1, :m - 1])
        except np.linalg.LinAlgError:
            return None
        if np.any(np.diag(L) ** 2 < CHOL_MIN_PIVOT * dg[:m - 1]):
            return None
        R[:m - 1, :m - 1] = L.T
        R[:m - 1, m - 1] = scipy.linalg.solve_triangular(L, G[:m - 1, m - 1], lower=True, check_finite=False)
    return R


def _within_gram(Xi: np.ndarray, ci: np.ndarray) -> np.ndarray | None:
    """(m x m) float64 Gram matrix of the manifold's points about their own center, (Xi - ci)(Xi - ci)^T.

    It does not depend on the center model, so manifold_analysis computes it while the center
    model is fitted. None when N < m (_prepare_one then takes the QR route)."""
    m, N = Xi.shape
    if N < m:
        return None
    Zc = np.subtract(Xi, ci, dtype=np.float64)
    return Zc @ Zc.T


def _prepare_one(Xi: np.ndarray, ci: np.ndarray, xbar: np.ndarray, V11: np.ndarray,
                 G0: np.ndarray | None = None) -> np.ndarray:
    """sD1 of one manifold (spec steps 8-11), in a canonical basis.

    Spec: Z = (Xi - xbar)(I - V11 V11^T), S = (Z - mean(Z)) / ||mean(Z)||. Since the projection
    commutes with the centring, Z - mean(Z) = (Xi - ci)(I - V11 V11^T) with ci the class center, so
    S S^T = (G0 - p p^T) / ||mean(Z)||^2 with G0 = (Xi - ci)(Xi - ci)^T (see _within_gram; given or
    computed here) and p = (Xi - ci) V11 (m x K): no m x N projected copy. Points are ordered by
    decreasing norm and S is replaced by the sign-fixed R factor of its QR (R = Q^T S, an isometry of
    S), so the result does not depend on the order of the points or on a rotation of the features.
    D = min(N, m) (the reference: m if N > m, else N). R is the Cholesky factor of S S^T (the same R
    up to rounding, far cheaper than a QR of the N x m matrix); it falls back to the QR of S^T when
    N < m or the Gram matrix is (nearly) rank-deficient beyond the centring.
    """
    m, N = Xi.shape
    zbar = np.asarray(ci, dtype=np.float64) - xbar
    if V11.shape[1]:
        zbar = zbar - V11 @ (V11.T @ zbar)
    nrm = float(np.linalg.norm(zbar))
    if not nrm > 0:
        return np.empty((0, 0))
    R = None
    p = None
    if N >= m:
        if G0 is None:
            G0 = _within_gram(Xi, ci)
        G = G0
        if V11.shape[1]:
            # p = (Xi - ci) V11 without an m x N float64 copy of the points (float64 input)
            p = (Xi if Xi.dtype == np.float64 else Xi.astype(np.float64)) @ V11 - ci @ V11
            G = G0 - p @ p.T
        G = G / (nrm * nrm)
        order = np.argsort(-np.diag(G), kind="stable")
        R = _chol_r(G[np.ix_(order, order)])
    if R is None:
        Z = np.subtract(Xi, ci, dtype=np.float64)            # (m, N): per manifold, never all of X
        if V11.shape[1]:
            # Z -= (Z V11) V11^T in place (BLAS on the transposed, Fortran-ordered view)
            p = Z @ V11
            Z = scipy.linalg.blas.dgemm(-1.0, V11, p.T, beta=1.0, c=Z.T, overwrite_c=True).T
        Z /= nrm
        order = np.argsort(-np.einsum("ij,ij->i", Z, Z), kind="stable")
        R = np.linalg.qr(Z[order].T, mode="r")             # (min(N, m), m)
        R *= qr_signs(R)[:, None]
    return np.vstack([R, np.ones((1, m))])


def _prepare_reference(Xi: np.ndarray, xbar: np.ndarray, V11: np.ndarray) -> np.ndarray:
    """sD1 of one manifold exactly as the reference builds it (seed_mode="reference").

    Points in their given order, features in the given basis: S (N, m); if N > m, S is replaced by
    Q^T S with Q from scipy's economic QR of S (no sign fixing), so D = m; else D = N.
    """
    Z = np.asarray(Xi, dtype=np.float64) - xbar           # (m, N)
    if V11.shape[1]:
        Z -= (Z @ V11) @ V11.T
    zbar = Z.mean(axis=0)
    nrm = float(np.linalg.norm(zbar))
    if not nrm > 0:
        return np.empty((0, 0))
    S = ((Z - zbar) / nrm).T                              # (N, m)
    if S.shape[0] > S.shape[1]:
        Qs = scipy.linalg.qr(S, mode="economic")[0]
        S = Qs.T @ S
    return np.vstack([S, np.ones((1, S.shape[1]))])


def manifold_metrics(sD1: np.ndarray, T: np.ndarray, kappa: float, max_iter: int):
    """(alpha, R, D, n_qp, n_fail) of one prepared manifold: its Gram matrix formed once (anchor_gram,
    BLAS) and reused by the anchor kernel for all n_t samples."""
    return manifold_metrics_gram(sD1, anchor_gram(sD1), T, kappa, max_iter)


SEED_MODES = ("spawn", "reference")


def _n_threads() -> int:
    """Threads of the center model and the per-manifold pool (patched to 1 by a test)."""
    return available_cores()


def manifold_analysis(
    X,
    labels=None,
    *,
    kappa: float = 0.0,
    n_t: int = 200,
    n_reps: int = 10,
    seed=None,
    solver: str = "fast",
    K: int | None = None,
    seed_mode: str = "auto",
) -> ManifoldAnalysisResult:
    """Replica mean-field manifold analysis of class manifolds (spec: shared/spec/mftma.md).

    X: (n_samples, n_features) with labels (n_samples,), or a list of per-class (m_i, n_features)
    arrays (labels=None). kappa >= 0: margin; n_t: Gaussian samples per manifold; n_reps: random
    restarts per K of the center model; seed: int / Generator / SeedSequence; solver: "fast" (exact
    active-set NNLS, numba) or "cvxpy" (one QP per sample, reference path); K: None selects K as
    the reference does (argmin of the residual center correlation), an int fixes it (0 = none).

    Randomness: seed_mode="spawn" (default): the seed spawns one stream for the center model and
    one per manifold (manifolds taken in a canonical order: decreasing distance of their center from
    the mean center), so results do not depend on the thread count, on the order of the classes or
    of the points. seed_mode="reference": seed must be an int in [0, 2**32); a local
    ``np.random.RandomState(seed)`` is consumed exactly as the reference consumes numpy's global RNG
    after ``np.random.seed(seed)`` (center-model starts, then each manifold's t-vectors in class
    order), with the reference's bases and its optimiser to the letter, so the t-vectors equal the
    reference's and the results match it to rounding; results then depend on class and point order
    (as the reference's do), not on the thread count. The global RNG is never touched.
    seed_mode="auto" (default): "reference" when X is a list of per-class arrays (the reference's
    calling convention) and seed is an integer in [0, 2**32), so that such a call reproduces the
    reference's numbers; "spawn" otherwise, in particular for (X, labels), whose results are then
    invariant to the order of examples and to relabelling the classes.
    """
    kappa = check_nonneg_float(kappa, "kappa")
    n_t = check_positive_int(n_t, "n_t")
    n_reps = check_positive_int(n_reps, "n_reps")
    solver = check_choice(solver, "solver", SOLVERS)
    if K is not None:
        K = check_positive_int(K, "K", minimum=0)
    seed_mode = check_choice(seed_mode, "seed_mode", SEED_MODES + ("auto",))
    if seed_mode == "auto":
        ref_ok = (labels is None and isinstance(X, (list, tuple)) and isinstance(seed, numbers.Integral)
                  and not isinstance(seed, (bool, np.bool_)) and 0 <= int(seed) < 2**32)
        seed_mode = "reference" if ref_ok else "spawn"
    if seed_mode == "reference":
        if (isinstance(seed, (bool, np.bool_)) or not isinstance(seed, numbers.Integral)
                or not 0 <= int(seed) < 2**32):
            raise InputError(
                f"seed must be an integer in [0, 2**32) with seed_mode='reference' (it seeds a "
                f"legacy numpy RandomState, as np.random.seed does in the reference), got {seed!r}"
            )
        rng = np.random.RandomState(int(seed))
    else:
        rng = check_seed(seed)
    man = as_manifolds(X, labels)
    return _analyse(man, kappa=kappa, n_t=n_t, n_reps=n_reps, rng=rng, solver=solver, K=K)


def _analyse(man: Manifolds, *, kappa, n_t, n_reps, rng, solver, K) -> ManifoldAnalysisResult:
    reference = isinstance(rng, np.random.RandomState)
    P, N = man.P, man.N
    notes: list[str] = []
    # 1. pooled mean and class centers (float64 accumulation, one class at a time)
    centers = np.empty((P, N))
    total = np.zeros(N)
    for i in range(P):
        Xi = man.get(i)
        s = Xi.sum(axis=0, dtype=np.float64)
        total += s
        centers[i] = s / Xi.shape[0]
    xbar = total / man.sizes.sum()
    # canonical manifold order: decreasing distance of the center from the mean center
    dist = np.linalg.norm(centers - centers.mean(axis=0), axis=1)
    if reference:   # the reference's order and one legacy stream for everything
        canon = np.arange(P)
        cm_rng = rng
    else:
        canon = np.argsort(-dist, kind="stable")
        entropy = rng.integers(0, 2**63 - 1, size=4, dtype=np.int64)
        children = np.random.SeedSequence([int(e) for e in entropy]).spawn(P + 1)
        cm_rng = np.random.default_rng(children[0])
    # 2. center correlation and center model; meanwhile (spawn mode) the within-manifold Gram
    # matrices, which do not depend on it, on the other cores
    n_threads = _n_threads()
    with blas_threads(1), ThreadPoolExecutor(max_workers=n_workers(P)) as ex:  # no nested BLAS threads
        grams = None
        if not reference and n_threads > 1:
            grams = [ex.submit(_within_gram, man.get(i), centers[i]) for i in canon]
        cm = fit_center_model(centers[canon], cm_rng, n_reps=n_reps, K=K, n_threads=n_threads)
        notes.extend(cm.notes)
        V11 = cm.V11
        # 3.-4. per-manifold preparation (threads; each manifold independent), t-vectors, anchors
        cap = nnls_max_iter(int(man.sizes.max()))

        def prep(r: int) -> np.ndarray:
            if reference:
                return _prepare_reference(man.get(canon[r]), xbar, V11)
            return _prepare_one(man.get(canon[r]), centers[canon[r]], xbar, V11,
                                grams[r].result() if grams else None)

        def spawn_t(r: int, d1: int) -> np.ndarray:
            """Manifold r's Gaussian samples in spawn mode: its own stream, whatever runs it."""
            return np.random.default_rng(children[1 + r]).standard_normal((d1, n_t))

        metrics = None
        if reference or solver != "fast":
            sd1s = list(ex.map(prep, range(P)))
        else:
            # spawn mode: one task prepares a manifold, draws its t-vectors from its own stream and
            # finds its anchors, so that one worker's preparation (mostly small numpy calls holding
            # the GIL) overlaps another's anchors (numba, GIL released)
            def prep_and_anchor(r: int):
                sd = prep(r)
                if sd.size == 0:
                    return sd, None
                return sd, manifold_metrics(sd, spawn_t(r, sd.shape[0]), kappa, cap)

            both = list(ex.map(prep_and_anchor, range(P)))
            sd1s = [b[0] for b in both]
            metrics = [b[1] for b in both]
    for r, s in enumerate(sd1s):
        if s.size == 0:
            cls = man.classes[canon[r]]
            raise AnalysisError(
                f"class {cls}'s center lies in the removed center subspace (K = {cm.K}): its "
                "center norm is 0 after the projection, so the manifold cannot be normalised"
            )
    d1s = np.array([s.shape[0] for s in sd1s], dtype=np.int64)
    if reference:   # the reference's randn(D+1, n_t) per manifold, in class order
        Ts = [rng.randn(d1s[r], n_t) for r in range(P)]

    def t_vectors(r: int) -> np.ndarray:
        """Manifold r's Gaussian samples (spawn mode: from its own stream)."""
        return Ts[r] if reference else spawn_t(r, d1s[r])

    out = np.zeros((P, 5))
    if solver == "fast":
        if metrics is None:
            with blas_threads(1), ThreadPoolExecutor(max_workers=n_workers(P)) as ex:
                metrics = list(ex.map(lambda r: manifold_metrics(sd1s[r], t_vectors(r), kappa, cap), range(P)))
        out[:] = np.array(metrics, dtype=float)
        fails = int(out[:, 4].sum())
        if fails:
            raise AnalysisError(
                f"the active-set anchor solver did not converge on {fails} of {P * n_t} samples "
                f"(iteration cap {cap})"
            )
    else:
        stats: dict = {}
        for r in range(P):
            T = t_vectors(r)
            anchors, is_qp = cvxpy_anchors(sd1s[r], T, kappa, manifold=int(man.classes[canon[r]]), stats=stats)
            out[r, :3] = anchor_metrics(T, anchors, kappa)
            out[r, 3] = is_qp.sum()
        if stats.get("relaxed"):
            notes.append(f"{stats['relaxed']} of {int(out[:, 3].sum())} cvxpy QPs failed at tolerances 1e-12 and "
                         "were solved at the solver's default tolerances")
    # back to class order
    inv = np.empty(P, dtype=np.int64)
    inv[canon] = np.arange(P)
    alpha, R, D = out[inv, 0], out[inv, 1], out[inv, 2]
    with np.errstate(divide="ignore"):
        capacity = float(1.0 / np.mean(1.0 / alpha))
    return ManifoldAnalysisResult(
        capacity=capacity, radius=float(R.mean()), dimension=float(D.mean()),
        center_correlation=cm.rho_c, K=cm.K, classes=man.classes.copy(), class_capacity=alpha,
        class_radius=R, class_dimension=D, class_sizes=man.sizes.copy(), class_D=(d1s - 1)[inv],
        res_coeff=cm.res_coeff, max_K=cm.max_K, n_qp=int(out[:, 3].sum()), n_samples=P * n_t,
        solver=solver, kappa=kappa, n_t=n_t, n_reps=n_reps, notes=tuple(notes),
    )
