"""Center correlation rho_c and the low-rank center model (spec section 2).

Works on the (P, N) matrix of class centers only (thin QR / SVD; never an N x N matrix).
"""
from __future__ import annotations

import contextlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import scipy.linalg

from .._kernels.mftma_centers import center_cost_grad, fit_and_score, residual_stats
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

# Default rule (seed_mode="spawn"; docs/metrics.md, "MFTMA center model"): rank K by a loose scan,
# then for the candidate K keep the lowest-cost CONVERGED fit, restarting until a second fit reaches
# that minimum (or the budget is spent).
#: Restarts per batch: fits run two at a time (one per core) whatever the thread count, so the
#: number of fits, hence every result, does not depend on it.
FIT_BATCH = 2
#: A fit is converged when its Riemannian gradient norm is <= gtol * max(1, P / GTOL_P): the cost
#: sums P^2 squared cosines, so an absolute 1e-6 asks far more digits of a P = 1,000 fit than of a
#: P = 10 fit (at P = 1,000, 5e-5 leaves res_coeff within 3e-7 relative of the 1e-6 fit).
GTOL_P = 20.0
#: ... and the optimiser stops there; but rounding can stop the line search first where the cost is
#: stiff (a center whose residual is short: cos^2 terms with curvature ~1e3 put the attainable gradient
#: norm at sqrt(curvature * eps * cost) ~ 1e-5). A fit counts as converged when its final gradient
#: norm is <= CONV_SLACK times that tolerance and it did not stop at the iteration cap; the aborted
#: fits that the reference's stability rule favours stop with gradient norms of 1e-1 to 1e2.
CONV_SLACK = 100.0
#: The K scan fits n_scan = max(1, min(n_reps, ceil(SMALL_P_FITS / P))) starts per K (5 at P = 10,
#: 2 at P = 30, 1 from P = 50: small problems are cheap and multimodal) to a loose tolerance
#: (SCAN_GTOL times the convergence tolerance, at most SCAN_MAX_ITER iterations): enough to rank the K.
SMALL_P_FITS = 50
SCAN_GTOL = 10.0
SCAN_MAX_ITER = 100
#: Candidate K (scan res_coeff within RES_TIE_RTOL of the lowest; at most
#: max(1, min(MAX_CANDIDATES, ceil(MAX_CANDIDATES (CONFIRM_P / P)^2))) of them, lowest first: 3 up to
#: P = 100, 1 from P = 174; the others stay near-ties, see RES_TIE_RTOL) are then refitted to full tolerance: once from their scan frame, then from random frames,
#: FIT_BATCH at a time, n_min = max(2, min(2 n_reps, 20, ceil(CONFIRM_FITS / P))) fits at least (with
#: the default n_reps = 10: 20 up to P = 20, 4 at P = 100, 2 from P = 200: small problems are multimodal
#: and cheap; twice n_reps, the user's restart budget, caps it: the demo's n_reps = 2 gives 4), and more until a second fit
#: reaches the lowest-cost minimum or n_max = max(n_min, min(n_reps, ceil(n_reps (CONFIRM_P / P)^2)))
#: fits of that K are spent (a fit costs O(P^2 K) per iteration: n_reps up to P = 100, 2 from P = 224).
CONFIRM_FITS = 400
#: Below this P a fit takes well under a millisecond: fits run in the calling thread (no pool).
POOL_MIN_P = 50
MAX_CANDIDATES = 3
CONFIRM_P = 100.0
#: Two converged fits reach the same minimum when their costs agree to COST_RTOL (relative) and the
#: largest principal angle between their frames has sine <= FRAME_SIN_TOL.
COST_RTOL = 1e-7
FRAME_SIN_TOL = 1e-2
#: Distinct minima whose costs lie within NEAR_RTOL (relative) of the lowest make K's fit not unique.
NEAR_RTOL = 1e-5
#: A K whose res_coeff is within this relative distance of the minimum is a near-tie: another seed's
#: restarts may well select it, so it joins the alternative center models.
RES_TIE_RTOL = 5e-3
#: At most this many alternative center models (other frames or K that other restarts would have
#: given) are re-analysed for the center model's share of the standard errors.
MAX_ALTERNATIVES = 4


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
    cost: np.ndarray = field(default_factory=lambda: np.zeros(0))       # kept fit's cost per K tried
    confirmed: np.ndarray = field(default_factory=lambda: np.zeros(0, bool))  # min reached twice (default rule)
    fits_per_K: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    #: other (K, V11) that restarts gave with (near-)equal standing where the fit is not unique
    #: (default rule); manifold_analysis re-analyses them for the center model's share of the SEs
    alternatives: tuple = ()
    degenerate: bool = False     # the selected K's fit is not unique (see notes)


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

    K=None selects K = argmin res_coeff over the K scanned; an int fixes K (0 = remove nothing).

    rng a Generator (default, seed_mode="spawn"): a loose scan of K ranks them, then for the candidate
    K the lowest-cost converged fit, confirmed by a second restart (_fit_min_cost; n_reps bounds the
    restarts per candidate K, see CONFIRM_FITS). Not the reference's rule: docs/metrics.md, "MFTMA
    center model".
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
    if not reference:
        return _fit_min_cost(Y, C, Q, N, rho_c, max_k, max_k_ref, notes, rng, n_reps=n_reps, K=K,
                             max_iter=max_iter, gtol=gtol, min_step=min_step, n_threads=n_threads)
    last = max_k if (K is None or reference) else K
    if reference and K is not None and K > last:
        last = K
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
                rng.randn(P, 1)                           # the reference's unused s
                V0s[r] = np.linalg.qr(rng.randn(n, k))[0]  # pymanopt Stiefel(n, k).rand()
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


def _sin_angle(A: np.ndarray, B: np.ndarray) -> float:
    """Sine of the largest principal angle between span(A) and span(B) (orthonormal, same shape)."""
    sv = np.linalg.svd(A.T @ B, compute_uv=False)
    return float(np.sqrt(max(0.0, 1.0 - float(sv.min()) ** 2))) if sv.size else 0.0


def welch_res_bound(P: int, dim: int) -> float:
    """Lower bound on res_coeff (mean |off-diagonal cosine|) of ANY P vectors in `dim` dimensions:
    mean |cos| >= mean cos^2 >= (P / dim - 1) / (P - 1) (Welch's bound sum_{a != b} cos^2 >= P^2/dim - P).
    0 when dim >= P. It grows with K (dim = n - K), so once it exceeds the best res_coeff found, no
    larger K can be selected."""
    if dim <= 0:
        return np.inf
    return max(0.0, (P / dim - 1.0) / (P - 1.0))


def _cluster(fits: list[dict], f_scale: float) -> list[dict]:
    """Group converged fits that reached the same minimum (cost within COST_RTOL, frames within
    FRAME_SIN_TOL); clusters sorted by cost, each represented by its lowest-cost fit."""
    clusters: list[dict] = []
    for fit in sorted((f for f in fits if f["converged"]), key=lambda f: (f["cost"], f["index"])):
        for c in clusters:
            if (abs(fit["cost"] - c["cost"]) <= COST_RTOL * f_scale
                    and _sin_angle(fit["V"], c["V"]) <= FRAME_SIN_TOL):
                c["members"].append(fit)
                break
        else:
            clusters.append({"cost": fit["cost"], "V": fit["V"], "fit": fit, "members": [fit]})
    return clusters


def _fit_min_cost(Y, C, Q, N, rho_c, max_k, max_k_ref, notes, rng, *, n_reps, K, max_iter, gtol,
                  min_step, n_threads) -> CenterModel:
    """The default center model: for each K the lowest-cost converged fit, confirmed by a restart.

    Every fit is an L-BFGS run to gradient norm gtol * max(1, P / GTOL_P) (converged: see
    CONV_SLACK) on the one factorisation (Y, C = Y Y^T) of the centers, O(P^2 K) per cost and gradient.

    1. Scan (K=None): K = 1, 2, ... with n_scan = max(1, min(n_reps, ceil(SMALL_P_FITS / P))) fits
       each; for K >= 2 the first start is warm (the previous K's kept frame plus one random
       direction s^T Y), the others random orthonormal frames Y^T S (S standard normal P x K). The
       scan stops at maxK, at the reference's early stop (res_coeff rose on 3 steps in a row after
       K = 4), or when Welch's lower bound on res_coeff for the next K exceeds the best res_coeff
       found (welch_res_bound): no larger K can then be selected.
    2. Confirmation: for the candidate K (the argmin of res_coeff and every K within RES_TIE_RTOL of
       it; with K fixed only K, from random starts), random restarts FIT_BATCH at a time until a
       second fit, at least one of the two from a random start, reaches the lowest-cost converged
       minimum (_cluster), or max(n_scan, n_reps) fits of that K are spent. A lower minimum found here
       replaces the K's frame and res_coeff; new candidates are confirmed in turn.
    Aborted fits (iteration cap, failed line search) are never kept while a converged fit exists.
    The warm start only speeds the search: a minimum found by it alone is not confirmed.
    """
    P, n = Y.shape
    gtol_eff = gtol * max(1.0, P / GTOL_P)
    n_scan = max(1, min(n_reps, -(-SMALL_P_FITS // P)))
    n_min = max(2, min(2 * n_reps, 20, -(-CONFIRM_FITS // P)))
    n_max = max(n_min, min(n_reps, int(np.ceil(n_reps * (CONFIRM_P / P) ** 2))))
    n_cand = max(1, min(MAX_CANDIDATES, int(np.ceil(MAX_CANDIDATES * (CONFIRM_P / P) ** 2))))
    last = max_k if K is None else K
    slots: dict[int, dict] = {}
    counters = {"fits": 0, "iters": 0}
    with contextlib.ExitStack() as stack:
        pool = None
        if n_threads > 1 and last >= 1 and P >= POOL_MIN_P:
            stack.enter_context(blas_threads(1))
            pool = stack.enter_context(ThreadPoolExecutor(max_workers=min(FIT_BATCH, n_threads)))

        def fits_from(k: int, n_new: int, Vwarm, tol: float, cap: int) -> list[dict]:
            """n_new fits of K = k, the first from Vwarm when given (a frame of k or k - 1 columns; a
            missing column is one random direction s^T Y), the others from random frames Y^T S. The
            starts are drawn here, in order, so results do not depend on the thread count."""
            starts = []
            for j in range(n_new):
                warm = j == 0 and Vwarm is not None
                if warm and Vwarm.shape[1] == k:
                    A = Vwarm
                elif warm:
                    A = np.concatenate([Vwarm, (rng.standard_normal(P) @ Y)[:, None]], axis=1)
                else:
                    A = Y.T @ rng.standard_normal((P, k))
                starts.append((warm, _sign_fixed_qr(A)[0]))
            fit = lambda st: fit_and_score(Y, C, st[1], cap, tol, min_step, False)
            outs = list(pool.map(fit, starts)) if pool is not None and n_new > 1 else [fit(st) for st in starts]
            new = []
            for (warm, _), (V, f, it, rc, st) in zip(starts, outs):
                gn = _grad_norm(Y, C, V)
                new.append({"warm": warm, "V": V, "cost": float(f), "stab": float(st),
                            "converged": bool(np.isfinite(f) and it < cap and gn <= CONV_SLACK * tol)})
                counters["iters"] += int(it)
            counters["fits"] += n_new
            return new

        def score(slot: dict, kept) -> None:
            slot["kept"] = kept
            slot["valid"] = kept is not None and kept["stab"] >= MIN_STABILITY
            slot["res"] = residual_stats(Y, C, kept["V"]) if slot["valid"] else (np.nan, 0.0, 0.0)

        def lowest(fits: list[dict]):
            ok = [f for f in fits if np.isfinite(f["cost"])]
            conv = [f for f in ok if f["converged"]]
            return min(conv or ok, key=lambda f: f["cost"]) if ok else None

        def refine(k: int, n_new: int, Vwarm=None) -> None:
            """More full-tolerance fits of K = k; keep the lowest-cost converged minimum (_cluster)."""
            slot = slots.setdefault(k, {"scan": [], "fits": [], "clusters": [], "confirmed": False})
            for f in fits_from(k, n_new, Vwarm, gtol_eff, max_iter):
                f["index"] = len(slot["fits"])
                slot["fits"].append(f)
            finite = [f["cost"] for f in slot["fits"] if np.isfinite(f["cost"])]
            slot["clusters"] = _cluster(slot["fits"], max(1.0, min(finite)) if finite else 1.0)
            if slot["clusters"]:
                best = slot["clusters"][0]["members"]
                slot["confirmed"] = len(best) >= 2 and any(not m["warm"] for m in best)
                score(slot, slot["clusters"][0]["fit"])
            else:
                score(slot, lowest(slot["fits"]))

        def res_of(k):
            return slots[k]["res"][0] if k in slots and slots[k]["valid"] else np.nan

        # 1. scan (loose tolerance): rank the K
        if K is None:
            Vprev = None
            for k in range(1, last + 1):
                slot = slots.setdefault(k, {"scan": [], "fits": [], "clusters": [], "confirmed": False})
                if k >= n:
                    notes.append(f"K = {k} skipped: it removes every center direction (P = {P})")
                    score(slot, None)
                    break
                slot["scan"] = fits_from(k, n_scan, Vprev, SCAN_GTOL * gtol_eff, SCAN_MAX_ITER)
                score(slot, lowest(slot["scan"]))
                if not slot["valid"]:
                    notes.append(f"K = {k} skipped: every fit removes a center entirely")
                    break
                Vprev = slot["kept"]["V"]
                res = [res_of(j) for j in range(1, k + 1)]
                if k > 4 and res[k - 1] > res[k - 2] > res[k - 3] > res[k - 4]:
                    break
                if welch_res_bound(P, n - k - 1) > np.nanmin(res):
                    if k < last:
                        notes.append(f"K scan stopped after K = {k}: Welch's bound on res_coeff for "
                                     f"K >= {k + 1} exceeds the best res_coeff {np.nanmin(res):.4g}")
                    break
        # 2. candidates: full tolerance, restarts until the lowest-cost minimum is reached twice
        done: set[int] = set()
        while True:
            if K is None:
                tried = sorted(k for k in slots if slots[k]["valid"])
                if not tried:
                    break
                res = np.array([res_of(k) for k in tried])
                order = np.argsort(res, kind="stable")
                cands = [tried[i] for i in order[:n_cand] if res[i] <= res[order[0]] * (1.0 + RES_TIE_RTOL)]
            else:
                # K = n removes every center direction: residual cosines undefined (invalid, as in the scan)
                cands = [K] if 0 < K < n else []
            todo = [k for k in cands if k not in done]
            if not todo:
                break
            for k in todo:
                sl = slots.setdefault(k, {"scan": [], "fits": [], "clusters": [], "confirmed": False})
                if sl["scan"] and sl["kept"] is not None:
                    refine(k, 1, sl["kept"]["V"])       # polish the scan's frame
                while (len(slots[k]["fits"]) < n_min
                       or (not slots[k]["confirmed"] and len(slots[k]["fits"]) < n_max)):
                    refine(k, FIT_BATCH)
                done.add(k)
    n_tried = max(slots) if slots else 0
    res_arr = np.array([res_of(k) for k in range(1, n_tried + 1)], dtype=float)
    for k in range(1, n_tried + 1):
        sl = slots.get(k)
        if sl is not None and k in done and sl["fits"] and not sl["clusters"]:
            notes.append(f"K = {k}: none of {len(sl['fits'])} fits converged (gradient norm > "
                         f"{CONV_SLACK * gtol_eff:.2g}); the lowest-cost fit is kept")

    def frame(k):
        sl = slots.get(k)
        return sl["kept"]["V"] if sl is not None and sl["valid"] else None

    if K is None:
        if np.all(np.isnan(res_arr)):
            K_sel = 0
            notes.append(f"no valid K in 1..{max_k}: no center subspace removed (K = 0)")
        else:
            K_sel = int(np.nanargmin(res_arr)) + 1
    else:
        K_sel = K
        if K > 0 and frame(K) is None:
            raise AnalysisError(
                f"K = {K} is not usable for these centers: fitting it removes a center entirely "
                f"(P = {P}, center rank {n})"
            )
    # other center models that other restarts would have given: the next-lowest minima of a K whose
    # fit is not unique (reached once, or distinct minima within NEAR_RTOL), substituted for that K's
    # kept fit, and the K it then selects; near-tie K (res_coeff within RES_TIE_RTOL)
    alts: list[tuple[int, np.ndarray, float]] = []
    degenerate_k = []
    for k in sorted(slots):
        sl = slots[k]
        if not sl["valid"] or not sl["clusters"]:
            continue
        kept_cost = sl["kept"]["cost"]
        near = [c for c in sl["clusters"][1:]
                if not sl["confirmed"] or c["cost"] - kept_cost <= NEAR_RTOL * max(1.0, kept_cost)]
        if k in done and (not sl["confirmed"] or near):
            degenerate_k.append(k)
        for c in near[:MAX_ALTERNATIVES]:
            if k not in done:
                continue
            rc_c = residual_stats(Y, C, c["V"])[0]
            if K is None:
                r2 = res_arr.copy()
                r2[k - 1] = rc_c
                k_alt = int(np.nanargmin(r2)) + 1
            else:
                k_alt = K_sel
            if k_alt == k:
                alts.append((k, c["V"], c["cost"]))
            elif k_alt != K_sel and frame(k_alt) is not None:
                alts.append((k_alt, frame(k_alt), slots[k_alt]["kept"]["cost"]))
    seen = set()
    uniq = []
    for k_a, V_a, c_a in sorted(alts, key=lambda a: (a[0] != K_sel, a[2])):
        key = (k_a, round(c_a, 9))
        if key in seen or (k_a == K_sel and V_a is frame(K_sel)):
            continue
        seen.add(key)
        uniq.append((k_a, V_a))
    uniq = uniq[:MAX_ALTERNATIVES]
    ties = []
    if K is None and K_sel > 0:
        for k in range(1, n_tried + 1):
            if (k != K_sel and frame(k) is not None
                    and res_arr[k - 1] <= res_arr[K_sel - 1] * (1.0 + RES_TIE_RTOL)
                    and all(a[0] != k for a in uniq)):
                ties.append((k, frame(k)))
    uniq = (uniq + ties)[:MAX_ALTERNATIVES]
    conf_sel = K_sel > 0 and slots[K_sel]["confirmed"]
    if K is None and K_sel > 0 and not conf_sel and not uniq:
        # the selected K's minimum was reached once and no other converged minimum stands beside it:
        # the runner-up K (next lowest res_coeff) is what another seed may well select
        order = [int(k) for k in np.argsort(np.where(np.isnan(res_arr), np.inf, res_arr)) if np.isfinite(res_arr[k])]
        if len(order) > 1 and frame(order[1] + 1) is not None:
            uniq.append((order[1] + 1, frame(order[1] + 1)))
    degenerate = bool(K_sel > 0 and (K_sel in degenerate_k or uniq))
    if degenerate:
        k_list = sorted({a[0] for a in uniq} | {K_sel})
        why = []
        if not conf_sel:
            why.append(f"no second of {len(slots[K_sel]['fits'])} restarts reached the lowest-cost frame "
                       f"at K = {K_sel}")
        if ties:
            why.append(f"res_coeff of K = {', '.join(str(t[0]) for t in ties)} within "
                       f"{RES_TIE_RTOL:.1%} of the minimum at K = {K_sel}")
        if len(uniq) > len(ties):
            why.append(f"{len(uniq) - len(ties)} other restart minima of near-equal standing (K in {k_list})")
        notes.append("near-degenerate center geometry: " + "; ".join(why) + "; the standard errors "
                     "include the spread over these center models")
    V11 = np.zeros((N, 0)) if K_sel == 0 else Q @ frame(K_sel)
    alternatives = tuple((k_a, np.ascontiguousarray(Q @ V_a)) for k_a, V_a in uniq)
    ks = range(1, n_tried + 1)
    get = lambda k, key, dflt: slots[k][key] if k in slots and slots[k].get(key) is not None else dflt
    return CenterModel(
        rho_c=float(rho_c), K=K_sel, V11=np.ascontiguousarray(V11), max_K=max_k,
        max_K_reference=max_k_ref, res_coeff=res_arr,
        stability=np.array([get(k, "res", (0, 0.0, 0))[1] for k in ks], dtype=float),
        norm_coeff=np.array([get(k, "res", (0, 0, 0.0))[2] for k in ks], dtype=float),
        n_fits=counters["fits"], cg_iterations=counters["iters"], notes=tuple(notes),
        cost=np.array([slots[k]["kept"]["cost"] if frame(k) is not None else np.inf for k in ks], dtype=float),
        confirmed=np.array([bool(get(k, "confirmed", False)) for k in ks], dtype=bool),
        fits_per_K=np.array([len(get(k, "fits", [])) for k in ks], dtype=np.int64),
        alternatives=alternatives, degenerate=degenerate,
    )


def _grad_norm(Y, C, V) -> float:
    """Riemannian gradient norm of the center cost at V."""
    f, eg = center_cost_grad(Y, C, V)
    if not np.isfinite(f):
        return np.inf
    g = eg - V @ (V.T @ eg)
    return float(np.linalg.norm(g))
