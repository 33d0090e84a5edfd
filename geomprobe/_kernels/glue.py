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

from .nnls import accept_or_step as _accept_or_step  # the MFTMA kernels' Lawson-Hanson step

_DEP_TOL = 1e-11      # Cholesky pivot test (fraction of the squared column norm), as mftma_anchors
_VIOL_TOL = 1e-13     # violator threshold, relative to max |b|


@njit(cache=True, nogil=True)
def _dot(a, b, n):
    """sum_{c < n} a[c] b[c] with four independent partial sums (the loop is latency bound
    otherwise: without fastmath the compiler keeps one sequential sum)."""
    s0 = 0.0
    s1 = 0.0
    s2 = 0.0
    s3 = 0.0
    c = 0
    while c + 4 <= n:
        s0 += a[c] * b[c]
        s1 += a[c + 1] * b[c + 1]
        s2 += a[c + 2] * b[c + 2]
        s3 += a[c + 3] * b[c + 3]
        c += 4
    while c < n:
        s0 += a[c] * b[c]
        c += 1
    return (s0 + s1) + (s2 + s3)


@njit(cache=True, nogil=True)
def _chol_delete(L, k, q):
    """Remove row/column q from the Gram matrix whose lower Cholesky factor is L[:k, :k] (row-major).

    The rows below q move up one, leaving a lower Hessenberg block that Givens rotations of the
    column pairs (j, j + 1), j = q..k-2, make triangular again. The rotations are applied row by
    row (each row once, contiguous in memory), not column pair by column pair (a stride of one row
    per element): the same arithmetic, without a cache miss per element."""
    if q >= k - 1:
        return
    cs = np.empty(k)
    sn = np.empty(k)
    for i in range(q, k - 1):
        Li = L[i]
        Ln = L[i + 1]
        for c in range(i + 2):
            Li[c] = Ln[c]
        for j in range(q, i):
            x = Li[j]
            y = Li[j + 1]
            Li[j] = cs[j] * x + sn[j] * y
            Li[j + 1] = -sn[j] * x + cs[j] * y
        a = Li[i]
        b = Li[i + 1]
        r = np.sqrt(a * a + b * b)
        if r == 0.0:
            cs[i] = 1.0
            sn[i] = 0.0
        else:
            cs[i] = a / r
            sn[i] = b / r
            Li[i] = r
        Li[i + 1] = 0.0


@njit(cache=True, nogil=True)
def _solve_b(L, k, idx, b, rhs, yv):
    """yv = least-squares solution on the passive set idx[:k] (G_PP yv = b_P via the factor L)."""
    for r in range(k):                 # forward by rows of L (contiguous dot)
        Lr = L[r]
        yv[r] = (b[idx[r]] - _dot(Lr, yv, r)) / Lr[r]
    for r in range(k - 1, -1, -1):     # backward by columns of L^T = rows of L (axpy)
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
            w[i] = b[i]
        for q in range(k):             # G symmetric: row idx[q] = column idx[q], contiguous
            Gq = G[idx[q]]
            zq = z[idx[q]]
            for i in range(nw):
                w[i] -= Gq[i] * zq
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
            Gj = G[j]
            Lk = L[k]
            for r in range(k):
                Lk[r] = (Gj[idx[r]] - _dot(L[r], Lk, r)) / L[r, r]
            d2 = Gj[j] - _dot(Lk, Lk, k)
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
        # grow the working set and its signed Gram block: the new rows first (contiguous writes,
        # one row of K each), then their mirror into the old rows' new columns
        for t in range(nb):
            j = sel[t]
            ws[nw + t] = j
            in_ws[j] = True
            bw[nw + t] = b[j]
            zw[nw + t] = 0.0
        nw1 = nw + nb
        for t in range(nb):
            j = sel[t]
            sj = sgn[j]
            Gr = Gw[nw + t]
            if use_k:
                Kj = K[j]
                for q in range(nw1):
                    i = ws[q]
                    Gr[q] = sj * sgn[i] * Kj[i]
            else:
                Xj = X[j]
                for q in range(nw1):
                    i = ws[q]
                    Gr[q] = sj * sgn[i] * _dot(X[i], Xj, N)
        for q in range(nw):
            Gq = Gw[q]
            for t in range(nb):
                Gq[nw + t] = Gw[nw + t, q]
        nw = nw1
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
                    Kj = K[j]                 # row j = column j (K symmetric): contiguous
                    for i in range(n):
                        w[i] -= sgn[i] * Kj[i] * sj
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


@njit(cache=True, nogil=True)
def anchor_products(K, kix, hix, grp, wv, H, xt, GS, SH, St):
    """Products of one sample's anchors s_p = sum_{a in p} wv[a] x_a (p = grp[a], 0..nr-1).

    K: Gram rows/columns of the support points at K[kix[a], kix[b]]; H: (n, P) rows x_a . s0_nu
    read at H[hix[a]]; xt: (n,) x_a . t read at xt[hix[a]]. Outputs (first nr rows used, zeroed
    here): GS[p, q] = s_p . s_q (accumulated in both orders, then averaged: exactly symmetric),
    SH[p, nu] = s_p . s0_nu, St[p] = s_p . t."""
    m = kix.shape[0]
    nr = 0
    for a in range(m):
        if grp[a] + 1 > nr:
            nr = grp[a] + 1
    P = H.shape[1]
    for p in range(nr):
        St[p] = 0.0
        for q in range(nr):
            GS[p, q] = 0.0
        for c in range(P):
            SH[p, c] = 0.0
    for a in range(m):
        ga = grp[a]
        wa = wv[a]
        St[ga] += wa * xt[hix[a]]
        Ha = H[hix[a]]
        SHa = SH[ga]
        for c in range(P):
            SHa[c] += wa * Ha[c]
        Ka = K[kix[a]]
        GSa = GS[ga]
        for b in range(m):
            GSa[grp[b]] += wa * wv[b] * Ka[kix[b]]
    for p in range(nr):
        for q in range(p + 1, nr):
            g = 0.5 * (GS[p, q] + GS[q, p])
            GS[p, q] = g
            GS[q, p] = g
