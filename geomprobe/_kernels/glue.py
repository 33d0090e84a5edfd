"""GLUE / GCMC joint anchor problem: exact non-negative QP on the dual, by column generation.

For one sample (Gaussian t, dichotomy y) the joint QP over all manifolds

    min_v 1/2 ||v - t||^2   subject to   sgn_j <v, x_j> >= kappa   for every point j

(sgn_j = y of the manifold of point j) has the dual

    min_{lam >= 0} 1/2 lam^T G lam - b^T lam,   G_ij = sgn_i sgn_j <x_i, x_j>,  b_j = kappa - sgn_j <x_j, t>

and v = t + sum_j lam_j sgn_j x_j. For kappa = 0, b = -A t lies in the range of G: it is the NNLS
min ||A^T lam + t||^2. Only a few columns are active, so it is solved by column generation:

1. the working set W starts with the ``block`` columns of largest b (most violated at v = t);
2. the restricted problem on W is solved exactly by a Lawson-Hanson active set on G[W, W]
   (incremental Cholesky of the passive block, warm-started from the previous round's solution,
   which stays feasible when columns are added);
3. the full dual gradient w = b - G lam is formed with one product over the support of lam
   (K[:, support] when the point Gram K = X X^T is given, else X (X_support^T lam) - O(n N));
4. every column with w_j > tol that is not yet in W is a violator; the ``block`` largest enter W.
   Stop when there are none.

The KKT residual returned is  max( max_j w_j^+, max_{lam_j > 0} |w_j| ) / max_j |b_j|  (zero at the
exact optimum). The caller re-solves samples whose residual exceeds its threshold by another path.
Kernels never raise and run unchanged with NUMBA_DISABLE_JIT=1.
"""
from __future__ import annotations

import numpy as np
from numba import njit

from .mftma_anchors import _accept_or_step
from .mftma_simcap import _chol_delete

_DEP_TOL = 1e-11      # Cholesky pivot test (fraction of the squared column norm), as mftma_anchors
_VIOL_TOL = 1e-13     # violator threshold, relative to max |b|


@njit(cache=True, nogil=True)
def _solve_b(L, k, idx, b, rhs, yv):
    """yv = least-squares solution on the passive set idx[:k] (G_PP yv = b_P via the factor L)."""
    for r in range(k):                 # forward by rows of L
        acc = b[idx[r]]
        Lr = L[r]
        for c in range(r):
            acc -= Lr[c] * yv[c]
        yv[r] = acc / Lr[r]
    for r in range(k - 1, -1, -1):     # backward by columns of L^T = rows of L (contiguous)
        Lr = L[r]
        yr = yv[r] / Lr[r]
        yv[r] = yr
        for c in range(r):
            yv[c] -= Lr[c] * yr


@njit(cache=True, nogil=True)
def _drop_zeros_b(L, k, idx, z, passive):
    """Drop the passive columns whose coefficient reached zero (Givens downdates of L)."""
    for q in range(k - 1, -1, -1):
        i = idx[q]
        if not z[i] > 0.0:
            z[i] = 0.0
            passive[i] = False
            _chol_delete(L, k, q)
            for t in range(q, k - 1):
                idx[t] = idx[t + 1]
            k -= 1
    return k


@njit(cache=True, nogil=True)
def _to_ls(L, k, idx, b, z, passive, excluded, nw, rhs, yv, it, max_iter):
    """Lawson-Hanson inner loop from a feasible z to the least-squares solution of its passive set.
    Returns (k, it, status)."""
    while k > 0:
        it += 1
        if it > max_iter:
            return k, it, 1
        _solve_b(L, k, idx, b, rhs, yv)
        if _accept_or_step(yv, z, idx, k):
            return k, it, 0
        k = _drop_zeros_b(L, k, idx, z, passive)
        for i in range(nw):
            excluded[i] = False
    return k, it, 0


@njit(cache=True, nogil=True)
def _lh_block(G, b, z, nw, kst, L, idx, passive, excluded, rhs, yv, w, cand, dep, block0, max_iter):
    """Lawson-Hanson on min 1/2 z^T G z - b^T z, z >= 0, over the first nw columns, continuing the
    converged state of a smaller working set (passive set idx[:kst[0]] with Cholesky factor L; the new
    columns start at z = 0, so the state stays feasible). Up to block0 columns enter per gradient
    pass, largest gradient first; entering columns whose least-squares coefficient is not positive
    leave again (most negative first); when a whole block fails, one column enters per pass (and a
    single failing column is excluded, as in Lawson-Hanson). Returns the number of inner iterations,
    or -1 if max_iter was reached. kst[0] is updated."""
    k = kst[0]
    tol = 0.0
    for i in range(nw):
        excluded[i] = False
        if abs(b[i]) > tol:
            tol = abs(b[i])
    tol *= _VIOL_TOL
    it = 0
    block = block0
    while True:
        for i in range(nw):
            acc = b[i]
            for q in range(k):
                acc -= G[i, idx[q]] * z[idx[q]]
            w[i] = acc
        nc = 0
        for i in range(nw):
            if (not passive[i]) and (not excluded[i]) and w[i] > tol:
                cand[nc] = i
                nc += 1
        if nc == 0:
            break
        nb = min(nc, block)
        vals = np.empty(nc)
        for t in range(nc):
            vals[t] = -w[cand[t]]
        order = np.argsort(vals, kind="mergesort")
        k0 = k
        ndep = 0
        for t in range(nb):
            j = cand[order[t]]
            for r in range(k):
                acc = G[idx[r], j]
                for c in range(r):
                    acc -= L[r, c] * L[k, c]
                L[k, r] = acc / L[r, r]
            d2 = G[j, j]
            for c in range(k):
                d2 -= L[k, c] * L[k, c]
            if not (d2 > _DEP_TOL * G[j, j] and d2 > 0.0):
                excluded[j] = True
                dep[ndep] = j
                ndep += 1
                continue
            L[k, k] = np.sqrt(d2)
            idx[k] = j
            k += 1
            passive[j] = True
        while k > k0:
            it += 1
            if it > max_iter:
                kst[0] = k
                return -1
            _solve_b(L, k, idx, b, rhs, yv)
            qmin = -1
            ymin = 0.0
            for q in range(k0, k):
                if yv[q] <= ymin:
                    ymin = yv[q]
                    qmin = q
            if qmin < 0:
                break
            j = idx[qmin]
            passive[j] = False
            if block == 1:
                excluded[j] = True
            for t in range(ndep):
                excluded[dep[t]] = False
            ndep = 0
            _chol_delete(L, k, qmin)
            for t in range(qmin, k - 1):
                idx[t] = idx[t + 1]
            k -= 1
        if k == k0:
            block = 1
            continue
        block = block0
        k, it, status = _to_ls(L, k, idx, b, z, passive, excluded, nw, rhs, yv, it, max_iter)
        if status:
            kst[0] = k
            return -1
    kst[0] = k
    return it


@njit(cache=True, nogil=True)
def _gram_entry(K, X, use_k, i, j):
    if use_k:
        return K[i, j]
    acc = 0.0
    for c in range(X.shape[1]):
        acc += X[i, c] * X[j, c]
    return acc


@njit(cache=True, nogil=True)
def joint_dual(K, X, use_k, sgn, b, lam, block, max_iter, inner_block=32):
    """Exact dual of one joint anchor QP by column generation (module docstring).

    K: (n, n) point Gram X X^T (read only when use_k), X: (n, N) points, sgn: (n,) +-1, b: (n,),
    lam: (n,) output; block: columns entering the working set per round; inner_block: columns entering
    the restricted active set per gradient pass. Returns (status, kkt_residual, n_rounds,
    working_set_size): status 0 = ok, 1 = inner iteration cap. A KKT violation left by columns that
    the pivot test excluded (dependent to rounding) shows only in the residual, which the caller
    checks."""
    n = b.shape[0]
    N = X.shape[1]
    bmax = 0.0
    for i in range(n):
        lam[i] = 0.0
        if abs(b[i]) > bmax:
            bmax = abs(b[i])
    if bmax == 0.0:
        return 0, 0.0, 0, 0
    tol = _VIOL_TOL * bmax
    cap = min(n, 4 * block)
    ws = np.empty(n, np.int64)
    in_ws = np.zeros(n, np.bool_)
    Gw = np.empty((cap, cap))
    nw = 0
    w = b.copy()
    zw = np.zeros(cap)
    bw = np.empty(cap)
    passive = np.zeros(cap, np.bool_)
    excluded = np.zeros(cap, np.bool_)
    idx = np.empty(cap, np.int64)
    dep = np.empty(cap, np.int64)
    wcand = np.empty(cap, np.int64)
    L = np.empty((cap + 1, cap + 1))
    rhs = np.empty(cap)
    yv = np.empty(cap)
    ww = np.empty(cap)
    kst = np.zeros(1, np.int64)
    cand = np.empty(n, np.int64)
    u = np.zeros(N)
    rounds = 0
    status = 0
    while True:
        nc = 0
        for i in range(n):
            if (not in_ws[i]) and w[i] > tol:
                cand[nc] = i
                nc += 1
        if nc == 0:
            break
        nb = min(nc, block)
        if nb < nc:
            vals = np.empty(nc)
            for t in range(nc):
                vals[t] = -w[cand[t]]
            order = np.argsort(vals, kind="mergesort")
            sel = np.empty(nb, np.int64)
            for t in range(nb):
                sel[t] = cand[order[t]]
        else:
            sel = cand[:nb].copy()
        rounds += 1
        if nw + nb > cap:             # grow the work arrays (the factor is rebuilt each round)
            cap = min(n, max(2 * cap, nw + nb))
            G2 = np.empty((cap, cap))
            G2[:nw, :nw] = Gw[:nw, :nw]
            Gw = G2
            z2 = np.zeros(cap)
            z2[:nw] = zw[:nw]
            zw = z2
            b2 = np.empty(cap)
            b2[:nw] = bw[:nw]
            bw = b2
            p2 = np.zeros(cap, np.bool_)
            p2[:nw] = passive[:nw]
            passive = p2
            excluded = np.zeros(cap, np.bool_)
            i2 = np.empty(cap, np.int64)
            i2[:kst[0]] = idx[:kst[0]]
            idx = i2
            dep = np.empty(cap, np.int64)
            wcand = np.empty(cap, np.int64)
            L2 = np.empty((cap + 1, cap + 1))
            L2[:kst[0], :kst[0]] = L[:kst[0], :kst[0]]
            L = L2
            rhs = np.empty(cap)
            yv = np.empty(cap)
            ww = np.empty(cap)
        # grow the working set and its signed Gram block
        for t in range(nb):
            j = sel[t]
            ws[nw] = j
            in_ws[j] = True
            bw[nw] = b[j]
            zw[nw] = 0.0
            for q in range(nw + 1):
                g = sgn[ws[q]] * sgn[j] * _gram_entry(K, X, use_k, ws[q], j)
                Gw[q, nw] = g
                Gw[nw, q] = g
            nw += 1
        r = _lh_block(Gw, bw, zw, nw, kst, L, idx, passive, excluded, rhs, yv, ww, wcand, dep, inner_block, max_iter)
        if r < 0:
            status = 1
            break
        for q in range(nw):
            lam[ws[q]] = zw[q]
        # full dual gradient w = b - G lam with one product over the support
        for i in range(n):
            w[i] = b[i]
        if use_k:
            for q in range(nw):
                j = ws[q]
                lj = lam[j]
                if lj > 0.0:
                    sj = sgn[j] * lj
                    for i in range(n):
                        w[i] -= sgn[i] * K[i, j] * sj
        else:
            for c in range(N):
                u[c] = 0.0
            for q in range(nw):
                j = ws[q]
                lj = lam[j]
                if lj > 0.0:
                    sj = sgn[j] * lj
                    for c in range(N):
                        u[c] += sj * X[j, c]
            for i in range(n):
                acc = 0.0
                for c in range(N):
                    acc += X[i, c] * u[c]
                w[i] -= sgn[i] * acc
    res = 0.0
    for i in range(n):
        if lam[i] > 0.0:
            a = abs(w[i])
        else:
            a = w[i]
        if a > res:
            res = a
    res /= bmax
    return status, res, rounds, nw


@njit(cache=True, nogil=True)
def joint_dual_batch(K, X, use_k, SGN, B, LAM, STAT, RES, block, max_iter):
    """joint_dual for every row s of SGN / B (n_t, n); fills LAM (n_t, n), STAT (n_t, 2) int64
    (status, rounds) and RES (n_t,) (KKT residual)."""
    for s in range(B.shape[0]):
        st, r, rounds, nw = joint_dual(K, X, use_k, SGN[s], B[s], LAM[s], block, max_iter)
        STAT[s, 0] = st
        STAT[s, 1] = rounds
        RES[s] = r
