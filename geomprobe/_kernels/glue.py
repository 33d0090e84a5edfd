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

from .mftma_anchors import _accept_or_step, _chol_rebuild, _chol_solve

_DEP_TOL = 1e-11      # Cholesky pivot test (fraction of the squared column norm), as mftma_anchors
_VIOL_TOL = 1e-13     # violator threshold, relative to max |b|


@njit(cache=True, nogil=True)
def _lh_warm(G, b, z, nw, max_iter, passive, excluded, idx, keep, L, rhs, yv, w):
    """Lawson-Hanson on min 1/2 z^T G z - b^T z, z >= 0, over the first nw columns, warm-started
    from the feasible z (its positive entries form the first passive set). Returns the number of
    inner iterations, or -1 if max_iter was reached."""
    tol = 0.0
    for i in range(nw):
        passive[i] = False
        excluded[i] = False
        if abs(b[i]) > tol:
            tol = abs(b[i])
    tol *= 1e-13
    k = 0
    for i in range(nw):
        if z[i] > 0.0:
            idx[k] = i
            k += 1
        else:
            z[i] = 0.0
    k = _chol_rebuild(G, idx, k, L, keep)
    for q in range(k):
        passive[idx[q]] = True
    for i in range(nw):
        if not passive[i]:
            z[i] = 0.0
    it = 0
    # move from the warm start to the least-squares solution of its passive set
    while k > 0:
        it += 1
        if it > max_iter:
            return -1
        for q in range(k):
            rhs[q] = b[idx[q]]
        _chol_solve(L, k, rhs, yv)
        if _accept_or_step(yv, z, idx, k):
            break
        kk = 0
        for q in range(k):
            i = idx[q]
            if z[i] > 0.0:
                idx[kk] = i
                kk += 1
            else:
                z[i] = 0.0
                passive[i] = False
        k = _chol_rebuild(G, idx, kk, L, keep)
        for i in range(nw):
            passive[i] = False
        for q in range(k):
            passive[idx[q]] = True
        for i in range(nw):
            if not passive[i]:
                z[i] = 0.0
    while True:
        for i in range(nw):
            acc = b[i]
            for q in range(k):
                acc -= G[i, idx[q]] * z[idx[q]]
            w[i] = acc
        j = -1
        best = tol
        for i in range(nw):
            if (not passive[i]) and (not excluded[i]) and w[i] > best:
                best = w[i]
                j = i
        if j < 0:
            break
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
            continue
        L[k, k] = np.sqrt(d2)
        idx[k] = j
        k += 1
        passive[j] = True
        first = True
        while True:
            it += 1
            if it > max_iter:
                return -1
            for q in range(k):
                rhs[q] = b[idx[q]]
            _chol_solve(L, k, rhs, yv)
            if first and yv[k - 1] <= 0.0:
                k -= 1
                passive[j] = False
                excluded[j] = True
                break
            first = False
            if _accept_or_step(yv, z, idx, k):
                break
            kk = 0
            for q in range(k):
                i = idx[q]
                if z[i] > 0.0:
                    idx[kk] = i
                    kk += 1
                else:
                    z[i] = 0.0
                    passive[i] = False
            k = _chol_rebuild(G, idx, kk, L, keep)
            for i in range(nw):
                passive[i] = False
            for q in range(k):
                passive[idx[q]] = True
            for i in range(nw):
                if not passive[i]:
                    z[i] = 0.0
            for i in range(nw):
                excluded[i] = False
            if k == 0:
                break
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
def joint_dual(K, X, use_k, sgn, b, lam, block, max_iter):
    """Exact dual of one joint anchor QP by column generation (module docstring).

    K: (n, n) point Gram X X^T (read only when use_k), X: (n, N) points, sgn: (n,) +-1, b: (n,),
    lam: (n,) output. Returns (status, kkt_residual, n_rounds, working_set_size): status 0 = ok,
    1 = inner iteration cap, 2 = a round added no column although the KKT check failed (the
    residual then tells by how much)."""
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
    keep = np.empty(cap, np.bool_)
    L = np.empty((cap, cap))
    rhs = np.empty(cap)
    yv = np.empty(cap)
    ww = np.empty(cap)
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
            passive = np.zeros(cap, np.bool_)
            excluded = np.zeros(cap, np.bool_)
            idx = np.empty(cap, np.int64)
            keep = np.empty(cap, np.bool_)
            L = np.empty((cap, cap))
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
        r = _lh_warm(Gw, bw, zw, nw, max_iter, passive, excluded, idx, keep, L, rhs, yv, ww)
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
