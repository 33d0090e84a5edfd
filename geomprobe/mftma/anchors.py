"""Anchor points of one prepared manifold (spec section 4): fast exact solver and cvxpy reference path."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .._kernels.mftma_anchors import EPS_INTERIOR, anchor_metrics, anchor_points_kernel
from .._validation import AnalysisError, InputError, check_choice, check_matrix, check_nonneg_float

SOLVERS = ("fast", "cvxpy")
#: cvxpy back end of the reference path and its tolerances (Clarabel interior point).
CVXPY_SOLVER = "CLARABEL"
CVXPY_OPTIONS = {"tol_gap_abs": 1e-12, "tol_gap_rel": 1e-12, "tol_feas": 1e-12, "tol_ktratio": 1e-10,
                 "max_iter": 500}


def nnls_max_iter(m: int) -> int:
    """Iteration cap of the active-set solver; never reached in practice (finite method)."""
    return 50 * m + 1000


def anchor_gram(sD1: np.ndarray) -> np.ndarray:
    """G = sD1^T sD1 (m x m, C order, exactly symmetric) of one prepared manifold, formed once and
    reused by all its samples. numpy computes A^T A of one buffer with a BLAS rank-k update (syrk,
    half the work of a general product; GIL released) and mirrors the triangle; the mirror is
    enforced here in case a numpy build does not."""
    G = np.ascontiguousarray(sD1.T @ sD1)
    if not np.array_equal(G, G.T):
        G = np.triu(G) + np.triu(G, 1).T
    return G


@dataclass(frozen=True)
class AnchorResult:
    """Per-manifold MFTMA quantities from given t-vectors.

    alpha: capacity; radius: R_M; dimension: D_M; anchors: ((D+1), n_t) anchor points s~(t);
    is_qp: which samples needed the QP (the others are feasible: anchor = arg-max point).
    """
    alpha: float
    radius: float
    dimension: float
    anchors: np.ndarray
    is_qp: np.ndarray
    n_qp: int
    solver: str


def check_sd1(sD1, T, kappa) -> tuple[np.ndarray, np.ndarray, float]:
    sD1 = check_matrix(sD1, "sD1").astype(np.float64, copy=False)
    T = check_matrix(T, "T").astype(np.float64, copy=False)
    kappa = check_nonneg_float(kappa, "kappa")
    if sD1.shape[0] < 2:
        raise InputError(f"sD1 must have at least 2 rows (D dimensions + the center row), got shape {sD1.shape}")
    last = sD1[-1]
    if not np.allclose(last, 1.0, rtol=0, atol=1e-12):
        i = int(np.argmax(np.abs(last - 1.0)))
        raise InputError(f"sD1's last row must be all ones (the center coordinate), got {last[i]!r} in column {i}")
    if T.shape[0] != sD1.shape[0]:
        raise InputError(f"T has {T.shape[0]} rows but sD1 has {sD1.shape[0]} (both must be D+1)")
    return np.ascontiguousarray(sD1), np.ascontiguousarray(T), kappa


def anchor_points(sD1, T, kappa: float = 0.0, *, solver: str = "fast") -> AnchorResult:
    """alpha, R, D and the anchor points of one prepared manifold.

    sD1: ((D+1), m) points, last row all ones (spec step 11); T: ((D+1), n_t) Gaussian vectors;
    kappa >= 0: margin. ``solver="fast"``: exact active-set NNLS on the dual (numba);
    ``solver="cvxpy"``: one QP per sample through cvxpy (Clarabel), status checked.
    """
    solver = check_choice(solver, "solver", SOLVERS)
    sD1, T, kappa = check_sd1(sD1, T, kappa)
    if solver == "fast":
        alpha, R, D, anchors, is_qp, fails = anchor_points_kernel(sD1, anchor_gram(sD1), T, kappa,
                                                                   nnls_max_iter(sD1.shape[1]))
        if fails:
            raise AnalysisError(
                f"the active-set anchor solver did not converge on {fails} of {T.shape[1]} samples "
                f"(size {sD1.shape[0]} x {sD1.shape[1]}, iteration cap {nnls_max_iter(sD1.shape[1])})"
            )
    else:
        anchors, is_qp = cvxpy_anchors(sD1, T, kappa)
        alpha, R, D = anchor_metrics(T, anchors, kappa)
    return AnchorResult(float(alpha), float(R), float(D), anchors, is_qp, int(is_qp.sum()), solver)


def cvxpy_anchors(sD1: np.ndarray, T: np.ndarray, kappa: float, *, manifold: int | None = None,
                  solver_name: str = CVXPY_SOLVER, stats: dict | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Reference path: one QP  min 1/2||v||^2 - t.v  s.t. sD1^T v <= -kappa  per non-feasible sample.

    Each QP is solved with CVXPY_OPTIONS (tolerances 1e-12) and without warm start (Clarabel warm-started
    from the previous sample's solution failed on 2 of 20 samples of a 10-point manifold). Where the solver fails or does not
    report 'optimal' at those tolerances (it happens on the rank-deficient constraint matrices of
    centred manifolds with few points), the QP is solved once more at the solver's default
    tolerances; ``stats["relaxed"]`` counts those QPs (manifold_analysis names them in its notes).
    A QP that fails at both raises AnalysisError naming the manifold, the sample and the size.
    """
    import cvxpy as cp

    d1, m = sD1.shape
    n_t = T.shape[1]
    v = cp.Variable(d1)
    t = cp.Parameter(d1)
    cons = [sD1.T @ v <= -kappa]
    prob = cp.Problem(cp.Minimize(0.5 * cp.sum_squares(v) - t @ v), cons)
    proj = T.T @ sD1  # (n_t, m)
    anchors = np.empty((d1, n_t))
    is_qp = np.zeros(n_t, dtype=bool)
    where = "" if manifold is None else f" of manifold {manifold}"
    for s in range(n_t):
        jmax = int(np.argmax(proj[s]))
        anchor = sD1[:, jmax]
        if proj[s, jmax] + kappa >= 0.0:
            is_qp[s] = True
            t.value = T[:, s]
            problem = None
            for options in (CVXPY_OPTIONS, {}):
                try:
                    prob.solve(solver=solver_name, warm_start=False, **options)
                except cp.error.SolverError as exc:
                    problem = f"failed: {exc}"
                    continue
                if prob.status == cp.OPTIMAL:
                    problem = None
                    if options is not CVXPY_OPTIONS and stats is not None:
                        stats["relaxed"] = stats.get("relaxed", 0) + 1
                    break
                problem = f"returned status {prob.status!r}"
            if problem is not None:
                raise AnalysisError(
                    f"cvxpy solver {solver_name} {problem} on the anchor QP{where}, sample {s} "
                    f"(size: {d1} variables, {m} constraints), at tolerances 1e-12 and at its defaults"
                )
            vt = v.value - T[:, s]
            z = np.asarray(cons[0].dual_value, dtype=float)
            if np.linalg.norm(vt) >= EPS_INTERIOR and z.sum() > 0:
                anchor = -vt / z.sum()
        anchors[:, s] = anchor
    return anchors, is_qp
