"""Exact linear-separability test for the empirical (simulated) capacity (spec section 5).

Points x_i with labels y_i = +-1 are strictly separable by a hyperplane with bias iff some u has
a_i . u > 0 for all i, with a_i = y_i [x_i; 1] (Gordan's alternative: iff 0 is not in the convex hull of
the a_i). With the columns  a^_i = [a_i; 1]  and target  e = [0; 1]  the non-negative least-squares
problem  min_{z >= 0} ||sum_i z_i a^_i - e||^2  decides it (Lawson & Hanson, finite active set): with
u = sum_i z_i a_i and r1 = 1 - sum_i z_i, optimality gives a_i . u >= r1 = ||residual||^2 for all i.
So either the residual is non-zero and u separates strictly, or sum z_i a_i = 0 with sum z_i = 1
(the origin is in the hull: not separable).

The kernel returns the NNLS solution; the caller certifies a positive answer by recomputing every
margin a_i . u in float64 (strictness check). Kernels never raise; NUMBA_DISABLE_JIT=1 works.
"""
from __future__ import annotations

import numpy as np
from numba import njit

_DEP_TOL = 1e-11


@njit(cache=True, nogil=True)
def _chol_delete(L, k, q):
    """Remove row/column q from the Gram matrix whose Cholesky factor is L[:k, :k] (O(k^2) Givens)."""
    for i in range(q, k - 1):
        for c in range(i + 2):
            L[i, c] = L[i + 1, c]
    for j in range(q, k - 1):
        a = L[j, j]
        b = L[j, j + 1]
        r = np.sqrt(a * a + b * b)
        if r == 0.0:
            continue
        cs = a / r
        sn = b / r
        for i in range(j, k - 1):
            x = L[i, j]
            y = L[i, j + 1]
            L[i, j] = cs * x + sn * y
            L[i, j + 1] = -sn * x + cs * y
        L[j, j + 1] = 0.0


@njit(cache=True, nogil=True)
def hull_nnls(A, max_iter):
    """Lawson-Hanson NNLS on columns [a_i; 1] (a_i = rows of A, (m, d)) with target [0; 1].

    Returns (z, u = A^T z, r1 = 1 - sum z, status): status 0 = converged, 1 = iteration cap.
    """
    m, d = A.shape
    z = np.zeros(m)
    passive = np.zeros(m, np.bool_)
    excluded = np.zeros(m, np.bool_)
    idx = np.empty(m, np.int64)
    kmax = min(m, d + 2)
    L = np.empty((kmax + 1, kmax + 1))
    y = np.empty(kmax + 1)
    rhs = np.ones(kmax + 1)
    grow = np.empty(kmax + 1)
    u = np.zeros(d)
    w = np.ones(m)                        # gradient  1 - A u - sum z  at z = 0
    k = 0
    it = 0
    status = 0
    while True:
        j = -1
        best = 1e-12
        for i in range(m):
            if (not passive[i]) and (not excluded[i]) and w[i] > best:
                best = w[i]
                j = i
        if j < 0 or k >= kmax:
            break
        # Gram row of column j against the passive set, and its Cholesky row
        for q in range(k):
            acc = 1.0
            r = idx[q]
            for c in range(d):
                acc += A[r, c] * A[j, c]
            grow[q] = acc
        gjj = 1.0
        for c in range(d):
            gjj += A[j, c] * A[j, c]
        for q in range(k):
            acc = grow[q]
            for c in range(q):
                acc -= L[q, c] * L[k, c]
            L[k, q] = acc / L[q, q]
        d2 = gjj
        for c in range(k):
            d2 -= L[k, c] * L[k, c]
        if not (d2 > _DEP_TOL * gjj and d2 > 0.0):
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
                status = 1
                break
            # solve L L^T y = 1
            for r in range(k):
                acc = rhs[r]
                for c in range(r):
                    acc -= L[r, c] * y[c]
                y[r] = acc / L[r, r]
            for r in range(k - 1, -1, -1):
                acc = y[r]
                for c in range(r + 1, k):
                    acc -= L[c, r] * y[c]
                y[r] = acc / L[r, r]
            if first and y[k - 1] <= 0.0:
                k -= 1
                passive[j] = False
                excluded[j] = True
                break
            first = False
            ok = True
            for q in range(k):
                if y[q] <= 0.0:
                    ok = False
                    break
            if ok:
                for q in range(k):
                    z[idx[q]] = y[q]
                break
            step = 1.0
            qmin = -1
            for q in range(k):
                if y[q] <= 0.0:
                    zi = z[idx[q]]
                    a = zi / (zi - y[q])
                    if a < step:
                        step = a
                        qmin = q
            for q in range(k):
                i = idx[q]
                z[i] += step * (y[q] - z[i])
            if qmin >= 0:
                z[idx[qmin]] = 0.0
            # drop the passive columns that reached zero: Givens downdates of the Cholesky factor
            for q in range(k - 1, -1, -1):
                i = idx[q]
                if not z[i] > 0.0:
                    z[i] = 0.0
                    passive[i] = False
                    _chol_delete(L, k, q)
                    for t in range(q, k - 1):
                        idx[t] = idx[t + 1]
                    k -= 1
            for i in range(m):
                excluded[i] = False
            if k == 0:
                break
        if status:
            break
        # gradient w = 1 - A u - sum z, u = A^T z over the passive set
        for c in range(d):
            u[c] = 0.0
        sz = 0.0
        for q in range(k):
            i = idx[q]
            sz += z[i]
            for c in range(d):
                u[c] += z[i] * A[i, c]
        Au = np.dot(A, u)
        for i in range(m):
            w[i] = 1.0 - Au[i] - sz
    for c in range(d):
        u[c] = 0.0
    sz = 0.0
    for i in range(m):
        if z[i] != 0.0:
            sz += z[i]
            for c in range(d):
                u[c] += z[i] * A[i, c]
    return z, u, 1.0 - sz, status
