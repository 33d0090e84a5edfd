"""MFTMA anchor points: exact active-set NNLS on the dual, shared Gram matrix per manifold.

For one manifold with prepared points ``sD1`` ((D+1) x m, last row ones) and a Gaussian vector t, the
anchor QP (spec section 4, step 13)

    min_v 1/2 ||v||^2 - t.v   subject to  sD1[:, mu] . v <= -kappa  for all mu

has the dual  min_{z >= 0} 1/2 z^T G z - z^T b  with G = sD1^T sD1 and b = sD1^T t + kappa. Because the
last row of sD1 is all ones, b = sD1^T (t + kappa e_last): the dual is the non-negative least-squares
problem  min_{z >= 0} ||sD1 z - t'||^2  with t' = t + kappa e_last, for every kappa >= 0. It is solved
exactly (finite active-set method of Lawson & Hanson) with an incrementally updated Cholesky factor of
the passive block of G. v = t - sD1 z; the anchor is s~ = sD1 z / sum(z). sD1 z is unique even when G is
singular (duplicate points, fewer dimensions than points), and so is sum(z) = (sD1 z)_last: columns that
are linearly dependent on the passive set are never added (pivot test), so singular G is harmless.
The Cholesky, solve and Lawson-Hanson steps are shared with the simcap kernel (.nnls). G is formed
once per manifold (one BLAS product) and reused by every sample of the manifold.

Kernels never raise and run unchanged with NUMBA_DISABLE_JIT=1.
"""
from __future__ import annotations

import numpy as np
from numba import njit

from .nnls import accept_or_step, chol_append, chol_solve

# Reference rule: if ||v - t|| < EPS_INTERIOR the anchor is the arg-max point (spec 13).
EPS_INTERIOR = 1e-8


@njit(cache=True, nogil=True)
def _chol_rebuild(G, idx, k, L, grow):
    """Cholesky of G[idx[:k]][:, idx[:k]] into L, column by column with the pivot test of
    chol_append; columns whose pivot fails are dropped. Returns the new count; idx is compacted in
    place. grow is a work array. G is symmetric: its rows are read (contiguous)."""
    kk = 0
    for q in range(k):
        j = idx[q]
        Gj = G[j]
        for r in range(kk):
            grow[r] = Gj[idx[r]]
        if chol_append(L, kk, grow, Gj[j]):
            idx[kk] = j
            kk += 1
    return kk


@njit(cache=True, nogil=True)
def _kcap(m, d1):
    """Rows of the Cholesky work array: the passive set never exceeds rank(sD1) <= min(m, d1)
    (dependent columns are refused), plus one row for the pivot test of a refused column."""
    return min(m, d1 + 1)


@njit(cache=True, nogil=True)
def nnls_gram(G, b, z, max_iter):
    """Minimise 1/2 z^T G z - b^T z over z >= 0 (G = A^T A positive semi-definite), in place in z.

    Lawson-Hanson active set on the Gram form. Returns the number of inner iterations, or -1 if
    max_iter was reached (the caller reports it; z is then the last feasible iterate).
    """
    m = b.shape[0]
    return _nnls_ws(G, b, z, max_iter, np.zeros(m, np.bool_), np.zeros(m, np.bool_),
                    np.empty(m, np.int64), np.empty((m, m)), np.empty(m), np.empty(m), np.empty(m),
                    np.empty(m))


@njit(cache=True, nogil=True)
def _nnls_ws(G, b, z, max_iter, passive, excluded, idx, L, rhs, y, w, grow):
    """nnls_gram with caller-provided work arrays (no allocation per call).

    Working set over the points: z starts at 0, so the first column taken is the maximiser of
    b = sD1^T t' (the support-function point of the sample); every outer step solves the
    least-squares problem on the working (passive) set through its Cholesky factor and checks the
    full KKT conditions with one product against the reused Gram rows of the working set,
    w = b - G z (O(m k)); the most violated point enters. L has at least min(m, rank + 1) rows.
    """
    m = b.shape[0]
    kcap = L.shape[0]
    for i in range(m):
        passive[i] = False
        excluded[i] = False
    for i in range(m):
        z[i] = 0.0
        w[i] = b[i]
    bmax = 0.0
    for i in range(m):
        if abs(b[i]) > bmax:
            bmax = abs(b[i])
    tol = 1e-12 * bmax
    k = 0
    it = 0
    while True:
        # pick the most violated dual constraint among columns not yet passive
        j = -1
        best = tol
        for i in range(m):
            if (not passive[i]) and (not excluded[i]) and w[i] > best:
                best = w[i]
                j = i
        if j < 0:
            break
        if k >= kcap:       # cannot happen (k <= rank < kcap); refuse rather than overflow
            excluded[j] = True
            continue
        # append column j to the Cholesky factor of the passive block (G symmetric: row j)
        Gj = G[j]
        for r in range(k):
            grow[r] = Gj[idx[r]]
        if not chol_append(L, k, grow, Gj[j]):
            excluded[j] = True
            continue
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
            chol_solve(L, k, rhs, y)
            if first and y[k - 1] <= 0.0:
                # rounding made the new column useless: drop it and never take it again here
                k -= 1
                passive[j] = False
                excluded[j] = True
                break
            first = False
            if accept_or_step(y, z, idx, k):
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
            k = _chol_rebuild(G, idx, kk, L, grow)
            # columns dropped by the rebuild pivot test leave the passive set with value 0
            for i in range(m):
                passive[i] = False
            for q in range(k):
                passive[idx[q]] = True
            for i in range(m):
                if not passive[i]:
                    z[i] = 0.0
            for i in range(m):
                excluded[i] = False
            if k == 0:
                break
        # dual gradient w = b - G z over the working set: rows of G (contiguous), the same
        # summation order per entry as a column sweep
        for i in range(m):
            w[i] = b[i]
        for q in range(k):
            zq = z[idx[q]]
            Gq = G[idx[q]]
            for i in range(m):
                w[i] -= Gq[i] * zq
    return it


@njit(cache=True, nogil=True)
def _manifold_kernel(sD1, G, T, kappa, anchors, is_qp, max_iter):
    """Anchors for every column of T; fills anchors ((D+1) x n_t) and is_qp; returns #failures."""
    d1, m = sD1.shape
    n_t = T.shape[1]
    sT = np.ascontiguousarray(sD1.T)  # (m, D+1): point mu is row mu
    B = np.dot(np.ascontiguousarray(T.T), sD1)  # (n_t, m): t_s . s_mu
    z = np.empty(m)
    az = np.empty(d1)
    passive = np.zeros(m, np.bool_)
    excluded = np.zeros(m, np.bool_)
    idx = np.empty(m, np.int64)
    kc = _kcap(m, d1)
    L = np.empty((kc, kc))
    rhs = np.empty(kc)
    y = np.empty(kc)
    grow = np.empty(kc)
    w = np.empty(m)
    b = np.empty(m)
    fails = 0
    for s in range(n_t):
        # arg-max point (ties: first index) and g = max_mu t . s_mu
        best = -np.inf
        jmax = 0
        for mu in range(m):
            acc = B[s, mu]
            b[mu] = acc + kappa
            if acc > best:
                best = acc
                jmax = mu
        use_max = True
        is_qp[s] = False
        if best + kappa >= 0.0:
            is_qp[s] = True
            it = _nnls_ws(G, b, z, max_iter, passive, excluded, idx, L, rhs, y, w, grow)
            if it < 0:
                fails += 1
            for r in range(d1):
                az[r] = 0.0
            for mu in range(m):
                zm = z[mu]
                if zm != 0.0:
                    for r in range(d1):
                        az[r] += zm * sT[mu, r]
            nrm2 = 0.0
            for r in range(d1):
                nrm2 += az[r] * az[r]
            if np.sqrt(nrm2) >= EPS_INTERIOR and az[d1 - 1] > 0.0:
                use_max = False
                for r in range(d1):
                    anchors[r, s] = az[r] / az[d1 - 1]
        if use_max:
            for r in range(d1):
                anchors[r, s] = sT[jmax, r]
    return fails


@njit(cache=True, nogil=True)
def anchor_metrics(T, anchors, kappa):
    """alpha, R, D of one manifold from its t-vectors and anchors (spec section 4, step 14)."""
    d1, n_t = T.shape
    D = d1 - 1
    slam_sum = 0.0
    mean_s = np.zeros(d1)
    for s in range(n_t):
        ts = 0.0
        ss = 0.0
        for r in range(d1):
            ts += T[r, s] * anchors[r, s]
            ss += anchors[r, s] * anchors[r, s]
            mean_s[r] += anchors[r, s]
        mx = ts + kappa
        if mx < 0.0:
            mx = 0.0
        if ss > 0.0:
            lam = mx / ss
            slam_sum += lam * lam * ss
    for r in range(d1):
        mean_s[r] /= n_t
    slam_mean = slam_sum / n_t
    alpha = np.inf if slam_mean == 0.0 else 1.0 / slam_mean
    rsum = 0.0
    cos_sum = 0.0
    for s in range(n_t):
        last = anchors[d1 - 1, s]
        acc = 0.0
        tn = 0.0
        sn = 0.0
        dot = 0.0
        for r in range(D):
            dv = (anchors[r, s] - mean_s[r]) / last
            acc += dv * dv
            tn += T[r, s] * T[r, s]
            sn += anchors[r, s] * anchors[r, s]
            dot += T[r, s] * anchors[r, s]
        rsum += acc
        if tn > 0.0:
            cos_sum += dot / (np.sqrt(tn) * np.sqrt(sn + 1e-12))
    R = np.sqrt(rsum / n_t)
    cm = cos_sum / n_t
    Dm = D * cm * cm
    return alpha, R, Dm


@njit(cache=True, nogil=True)
def gram(sD1):
    """G = sD1^T sD1 (m x m), formed once per manifold by one BLAS product and made exactly
    symmetric (upper triangle copied to the lower), so that its rows can stand for its columns."""
    m = sD1.shape[1]
    G = np.dot(np.ascontiguousarray(sD1.T), np.ascontiguousarray(sD1))
    for i in range(m):
        for j in range(i + 1, m):
            G[j, i] = G[i, j]
    return G


@njit(cache=True, nogil=True)
def anchor_points_kernel(sD1, G, T, kappa, max_iter):
    """One manifold with its Gram matrix G = sD1^T sD1 (symmetric, C order): returns
    (alpha, R, D, anchors, is_qp, n_fail)."""
    d1, m = sD1.shape
    n_t = T.shape[1]
    anchors = np.empty((d1, n_t))
    is_qp = np.zeros(n_t, np.bool_)
    fails = _manifold_kernel(sD1, G, T, kappa, anchors, is_qp, max_iter)
    alpha, R, Dm = anchor_metrics(T, anchors, kappa)
    return alpha, R, Dm, anchors, is_qp, fails


@njit(cache=True, nogil=True)
def manifold_metrics_gram(sD1, G, T, kappa, max_iter):
    """One manifold with its Gram matrix G = sD1^T sD1 (symmetric, C order), without keeping the
    anchors: (alpha, R, D, n_qp, n_fail). Releases the GIL so that manifolds can be processed by a
    thread pool (results do not depend on the thread count)."""
    alpha, R, Dm, anchors, is_qp, fails = anchor_points_kernel(sD1, G, T, kappa, max_iter)
    return alpha, R, Dm, is_qp.sum(), fails


@njit(cache=True, nogil=True)
def manifold_metrics(sD1, T, kappa, max_iter):
    """manifold_metrics_gram with the Gram matrix formed here (gram)."""
    return manifold_metrics_gram(sD1, gram(sD1), T, kappa, max_iter)
