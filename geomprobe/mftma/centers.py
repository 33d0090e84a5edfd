"""Center correlation rho_c and the low-rank center model (spec section 2).

Works on the (P, N) matrix of class centers only (thin QR / SVD; never an N x N matrix).
"""
from __future__ import annotations

import contextlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import scipy.linalg

from .._kernels.mftma_centers import fit_and_score, residual_stats
from .._validation import AnalysisError, InputError
from ._data import blas_threads, n_workers

#: Riemannian CG settings for the center model (pymanopt's defaults, as in the reference: gradient
#: norm 1e-6, step length 1e-10, at most 1000 iterations).
CG_MAX_ITER = 1000
CG_GTOL = 1e-6
CG_MIN_STEP = 1e-10
#: A K whose best fit leaves some center with less than this fraction of its norm is invalid
#: (its residual cosines are undefined; happens for K = P-1, where every center direction is removed).
MIN_STABILITY = 1e-8


@dataclass(frozen=True)
class CenterModel:
    rho_c: float                 # mean |cos| between mean-subtracted centers (spec step 4)
    K: int                       # number of shared center directions removed
    V11: np.ndarray              # (N, K) orthonormal, in feature space
    max_K: int                   # reference maxK after the clamp
    max_K_reference: int         # the reference's unclamped maxK
    res_coeff: np.ndarray        # res_coeff[k-1] for K = k tried (NaN: invalid K)
    stability: np.ndarray        # best stability per K tried
    norm_coeff: np.ndarray       # mean residual-norm ratio per K tried
    n_fits: int
    cg_iterations: int
    notes: tuple[str, ...] = field(default_factory=tuple)


def qr_signs(R: np.ndarray) -> np.ndarray:
    """+-1 per row of a QR factor R: multiplying R's rows (and Q's columns) by them makes R's diagonal
    non-negative, which makes the thin QR unique for full column rank."""
    return np.where(np.diag(R) < 0, -1.0, 1.0)


def _sign_fixed_qr(A: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Thin QR with a non-negative R diagonal (unique for full column rank)."""
    Q, R = np.linalg.qr(A)
    sgn = qr_signs(R)
    return Q * sgn, R * sgn[:, None]


class _Basis:
    """Maps frames in center coordinates (n x K) to feature space (N x K): Q @ frame.

    Q (N x n) is the sign-fixed orthonormal basis of the mean-subtracted centers' span (economic QR of
    Xb^T = Q R). It is never formed when R11 = R[:n, :n] is well conditioned: the first n columns
    of Xb^T equal Q[:, :n] R11 (R is upper triangular), so Q frame = Xb[:n]^T (R11^-1 frame), and
    one thin QR of that N x K product restores orthonormality lost to rounding (same span). With
    cond(R11) > MAX_COND, or when given (reference mode), the explicit Q is used.
    """
    MAX_COND = 1e6

    def __init__(self, Xb, R=None, Q=None):
        self.Xb, self.R, self.Q = Xb, R, Q

    def __matmul__(self, frame: np.ndarray) -> np.ndarray:
        if frame.shape[1] == 0:
            return np.zeros((self.Xb.shape[1], 0))
        n = frame.shape[0]
        if self.Q is None:
            d = np.abs(np.diag(self.R[:n, :n]))
            if d.size and d.min() > d.max() / self.MAX_COND:
                w = scipy.linalg.solve_triangular(self.R[:n, :n], frame, check_finite=False)
                V = self.Xb[:n].T @ w
                Qv, Rv = _sign_fixed_qr(V)
                if np.all(np.diag(Rv) > 0.5):      # columns of V are orthonormal up to rounding
                    return Qv
            self.Q = _sign_fixed_qr(self.Xb.T)[0]
        return self.Q[:, :n] @ frame


def center_basis(centers: np.ndarray, *, reference: bool = False) -> tuple[np.ndarray, "_Basis", np.ndarray]:
    """(Y, Q, singular values): Y (P, n) = the mean-subtracted centers in the orthonormal basis Q (N, n).

    n = min(P-1, N). Spec steps 3 and 5: Y = (C - cbar)^T Q, via the economic QR of C - cbar
    (Householder R only; Q is applied lazily, see _Basis: ``Q @ frame``).
    reference=True: the reference's basis exactly (scipy's economic QR without sign fixing,
    Y = (C - cbar) Q), so that its random Stiefel starts mean the same frames.
    """
    P, N = centers.shape
    Xb = centers - centers.mean(axis=0)
    n = min(P - 1, N)
    if reference:
        Q, R = scipy.linalg.qr(Xb.T, mode="economic")
        sv = np.linalg.svd(R, compute_uv=False)
        Q = Q[:, :n]
        return np.ascontiguousarray(Xb @ Q), _Basis(Xb, Q=np.ascontiguousarray(Q)), sv
    R = np.linalg.qr(Xb.T, mode="r")                  # (min(N,P), P)
    R = R * qr_signs(R)[:, None]
    sv = np.linalg.svd(R, compute_uv=False)
    return np.ascontiguousarray(R[:n].T), _Basis(Xb, R=R), sv


def reference_max_k(sv: np.ndarray) -> int:
    """maxK as the reference computes it: last index with cumulative variance fraction < 0.95, + 11."""
    sq = sv ** 2
    total = np.cumsum(sq / sq.sum())
    vals = np.where(total < 0.95, total, 0.0)
    return int(np.argmax(vals)) + 11


def fit_center_model(centers: np.ndarray, rng: np.random.Generator | np.random.RandomState, *,
                     n_reps: int = 10, K: int | None = None, max_iter: int = CG_MAX_ITER,
                     gtol: float = CG_GTOL, min_step: float = CG_MIN_STEP,
                     n_threads: int = 1) -> CenterModel:
    """rho_c and the center model of the (P, N) float64 centers (rows in the caller's order).

    K=None selects K = argmin res_coeff over K = 1..maxK (reference rule: best-stability rep per K,
    early stop after three strict increases); an int fixes K (0 = remove nothing).

    rng a Generator: starts s^T Y plus the previous K's frame (one block of normals drawn up front).
    rng a legacy RandomState (seed_mode="reference"): the reference's draws and starts exactly. For
    each K tried and each rep it draws randn(P, 1) (the reference's s, whose start it then discards)
    and randn(n, K), whose unsigned QR factor is the start (pymanopt 0.2.5's Stiefel.rand(), as
    ConjugateGradient.solve is called without a start); basis as in the reference; CG exactly as
    pymanopt's; K = 1, 2, ... until the early stop (or maxK) even when K is fixed (then at least to
    K), so the draws after the fit are the reference's.
    """
    P, N = centers.shape
    reference = isinstance(rng, np.random.RandomState)
    Y, Q, sv = center_basis(centers, reference=reference)
    n = Y.shape[1]
    C = Y @ Y.T
    norms = np.sqrt(np.diag(C))
    scale = norms.max() if norms.size else 0.0
    if not scale > 0 or np.any(norms <= 1e-12 * scale):
        bad = int(np.argmin(norms))
        raise InputError(
            f"class centers must differ from the mean of all class centers; manifold {bad} has a "
            f"mean-subtracted center of norm {norms[bad]:.3g} (largest {scale:.3g})"
        )
    rho_c, _, _ = residual_stats(Y, C, np.zeros((n, 0)))
    max_k_ref = reference_max_k(sv)
    max_k = min(max_k_ref, P - 1, n)
    notes: list[str] = []
    if max_k < max_k_ref:
        notes.append(f"maxK clamped from {max_k_ref} to {max_k} (P = {P}, center rank <= {n})")
    if K is not None and K > n:
        raise InputError(
            f"K must be between 0 and {n} (P = {P} classes, N = {N} features), got {K}"
        )
    last = max_k if (K is None or reference) else K
    if reference and K is not None and K > last:
        last = K
    if not reference:
        starts = rng.standard_normal((max(last, 1), n_reps, P))
    res, stab, ratio, frames = [], [], [], []
    n_fits = 0
    iters = 0
    Vprev = np.zeros((n, 0))
    with contextlib.ExitStack() as stack:
        # one pool (and one BLAS thread limit) for all K: threadpoolctl costs milliseconds per entry
        pool = None
        if n_threads > 1 and last >= 1:
            stack.enter_context(blas_threads(1))
            pool = stack.enter_context(ThreadPoolExecutor(max_workers=n_workers(n_reps)))
        for k in range(1, last + 1):
            if k >= n:
                # removing all n center directions leaves zero residual centers: cosines undefined
                res.append(np.nan)
                stab.append(0.0)
                ratio.append(0.0)
                frames.append(None)
                notes.append(f"K = {k} skipped: it removes every center direction (P = {P})")
                break
            V0s = np.empty((n_reps, n, k))
            for r in range(n_reps):
                if reference:
                    rng.randn(P, 1)                           # the reference's unused s
                    V0s[r] = np.linalg.qr(rng.randn(n, k))[0]  # pymanopt Stiefel(n, k).rand()
                else:
                    A = np.concatenate([(starts[k - 1, r] @ Y)[:, None], Vprev], axis=1)
                    V0s[r] = _sign_fixed_qr(A)[0]
            if pool is not None:
                fits = list(pool.map(lambda r: fit_and_score(Y, C, V0s[r], max_iter, gtol, min_step,
                                                             reference), range(n_reps)))
            else:
                fits = [fit_and_score(Y, C, V0s[r], max_iter, gtol, min_step, reference)
                        for r in range(n_reps)]
            out_V = [f[0] for f in fits]
            out_stab = np.array([f[4] for f in fits])
            out_it = np.array([f[2] for f in fits])
            n_fits += n_reps
            iters += int(out_it.sum())
            # reference rule: keep the first rep with the strictly largest stability (> 0)
            best = -1
            best_stab = 0.0
            for r in range(n_reps):
                if out_stab[r] > best_stab:
                    best_stab = out_stab[r]
                    best = r
            if best < 0 or best_stab < MIN_STABILITY:
                res.append(np.nan)
                stab.append(best_stab)
                ratio.append(0.0)
                frames.append(None)
                notes.append(f"K = {k} skipped: every fit removes a center entirely (stability {best_stab:.2g})")
                break
            V = out_V[best]
            rc, st, nr = residual_stats(Y, C, V)
            res.append(rc)
            stab.append(st)
            ratio.append(nr)
            frames.append(V)
            Vprev = V
            if ((K is None or (reference and k >= K)) and k > 4
                    and res[k - 1] > res[k - 2] > res[k - 3] > res[k - 4]):
                break
    res_arr = np.array(res, dtype=float)
    if K is None:
        if np.all(np.isnan(res_arr)):
            K_sel = 0
            notes.append(f"no valid K in 1..{max_k}: no center subspace removed (K = 0)")
        else:
            K_sel = int(np.nanargmin(res_arr)) + 1
    else:
        K_sel = K
        if K > 0 and (K > len(frames) or frames[K - 1] is None):
            raise AnalysisError(
                f"K = {K} is not usable for these centers: fitting it removes a center entirely "
                f"(P = {P}, center rank {n})"
            )
    V11 = np.zeros((N, 0)) if K_sel == 0 else Q @ frames[K_sel - 1]
    return CenterModel(
        rho_c=float(rho_c), K=K_sel, V11=np.ascontiguousarray(V11), max_K=max_k,
        max_K_reference=max_k_ref, res_coeff=res_arr, stability=np.array(stab),
        norm_coeff=np.array(ratio), n_fits=n_fits, cg_iterations=iters, notes=tuple(notes),
    )
