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

from .nnls import (
    accept_or_step,
    chol_append,
    chol_append_rows,
    chol_delete,
    chol_solve,
    chol_solve_rows,
    dot_rows,
    drop_zeros,
)


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
        if not chol_append(L, k, grow, gjj):
            excluded[j] = True
            continue
        idx[k] = j
        k += 1
        passive[j] = True
        first = True
        while True:
            it += 1
            if it > max_iter:
                status = 1
                break
            chol_solve(L, k, rhs, y)   # L L^T y = 1
            if first and y[k - 1] <= 0.0:
                k -= 1
                passive[j] = False
                excluded[j] = True
                break
            first = False
            if accept_or_step(y, z, idx, k):
                break
            k = drop_zeros(L, k, idx, z, passive, excluded)
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


@njit(cache=True, nogil=True)
def _to_ls_solution(L, k, idx, z, passive, excluded, y, rhs, it, max_iter):
    """Lawson-Hanson inner loop: from a feasible z (> 0 on the passive set) move towards the
    least-squares solution on the passive set, dropping columns that reach zero, until that
    solution is positive (then z = it). Returns (k, it, status)."""
    m = z.shape[0]
    while k > 0:
        it += 1
        if it > max_iter:
            return k, it, 1
        chol_solve_rows(L, k, rhs, y)
        if accept_or_step(y, z, idx, k):
            return k, it, 0
        k = drop_zeros(L, k, idx, z, passive, excluded)
    return k, it, 0


@njit(cache=True, nogil=True)
def scan_critical(A, At, d_from, d_to, z, passive, idx, L, kst, max_iter, block0, jump):
    """First separable dimension of nested problems, by one Lawson-Hanson NNLS warm-started across d.

    A: (m, cap) signed augmented points, column 0 = y_i (bias), column c >= 1 = y_i x_i[c - 1];
    columns [0, d_to) are filled; At: the same (cap, m) transposed (both layouts, for rows and for
    A u). The NNLS state (z, passive, idx = passive columns in Cholesky
    order, L = Cholesky factor of their Gram matrix [a_i; 1] . [a_j; 1], kst[0] = their number) is
    the converged solution for the first d_from columns (d_from = 0, kst[0] = 0 to start). For
    d = d_from + 1 .. d_to: column d - 1 is appended (rank-1 update of L, then the inner loop from
    the previous, still feasible z, then Lawson-Hanson until no gradient entry exceeds 1e-12), and
    the problem on the first d columns is separable iff r1 = 1 - sum z > 0 and every margin
    a_i[:d] . u, u = sum z_i a_i[:d], recomputed in float64, is > 0 (strict; the NNLS certificate of
    the bisection test, see hull_nnls). Returns (d, status): d = first separable d (or -1 if none
    up to d_to), status 0, or status 1 = iteration cap hit at d (state then invalid). The state is
    left converged at the returned d (or at d_to)."""
    m = A.shape[0]
    u = np.zeros(A.shape[1])
    w = np.empty(m)
    marg = np.empty(m)
    excluded = np.zeros(m, np.bool_)
    kcap = L.shape[0] - 1
    y = np.empty(kcap + 1)
    rhs = np.ones(kcap + 1)
    grow = np.empty(kcap + 1)
    x = np.empty(kcap + 1)
    k = kst[0]
    cand = np.empty(m, np.int64)
    ent = np.empty(m, np.int64)
    dep = np.empty(m, np.int64)
    block = block0
    for d in range(d_from + 1, d_to + 1):
        c_new = d - 1
        it = 0
        # rank-1 update of the passive Gram factor with the new coordinate
        for q in range(k):
            x[q] = A[idx[q], c_new]
        for q in range(k):
            lqq = L[q, q]
            r = np.sqrt(lqq * lqq + x[q] * x[q])
            cs = r / lqq
            sn = x[q] / lqq
            L[q, q] = r
            for i in range(q + 1, k):
                L[i, q] = (L[i, q] + sn * x[i]) / cs
                x[i] = cs * x[i] - sn * L[i, q]
        if jump and d < d_to:
            continue                   # jump: append every column, solve at d_to only
        for i in range(m):
            excluded[i] = False
        k, it, status = _to_ls_solution(L, k, idx, z, passive, excluded, y, rhs, it, max_iter)
        if status:
            kst[0] = k
            return d, 1
        kmax = min(m, d + 2, kcap)
        while True:
            # gradient w = 1 - A u - sum z over the first d columns
            for c in range(d):
                u[c] = 0.0
            sz = 0.0
            for q in range(k):
                i = idx[q]
                zi = z[i]
                sz += zi
                for c in range(d):
                    u[c] += zi * A[i, c]
            kst[1] += 1
            # margins A u, column by column (contiguous rows of At: vectorised, fixed order)
            for i in range(m):
                marg[i] = 0.0
            for c in range(d):
                uc = u[c]
                for i in range(m):
                    marg[i] += uc * At[c, i]
            nc = 0
            for i in range(m):
                wi = 1.0 - marg[i] - sz
                w[i] = wi
                if (not passive[i]) and (not excluded[i]) and wi > 1e-12:
                    cand[nc] = i
                    nc += 1
            if nc == 0 or k >= kmax:
                break
            # entering columns: the largest gradient entries (one when the last block failed)
            nb = min(nc, block, kmax - k)
            if nb < nc:
                order = np.argsort(-w[cand[:nc]], kind="mergesort")
                for t in range(nb):
                    ent[t] = cand[order[t]]
            else:
                order = np.argsort(-w[cand[:nc]], kind="mergesort")
                for t in range(nb):
                    ent[t] = cand[order[t]]
            k0 = k
            ndep = 0
            for t in range(nb):
                j = ent[t]
                Aj = A[j]
                for q in range(k):
                    grow[q] = 1.0 + dot_rows(A[idx[q]], Aj, d)
                gjj = 1.0 + dot_rows(Aj, Aj, d)
                if not chol_append_rows(L, k, grow, gjj):
                    excluded[j] = True
                    dep[ndep] = j
                    ndep += 1
                    continue
                idx[k] = j
                k += 1
                passive[j] = True
            # every entering column must get a positive least-squares coefficient: drop the most
            # negative one until they all do (a single entering column that fails is excluded,
            # as in hull_nnls; when a whole block fails, the next step enters one column)
            while k > k0:
                it += 1
                if it > max_iter:
                    kst[0] = k
                    return d, 1
                chol_solve_rows(L, k, rhs, y)
                qmin = -1
                ymin = 0.0
                for q in range(k0, k):
                    if y[q] <= ymin:
                        ymin = y[q]
                        qmin = q
                if qmin < 0:
                    break
                j = idx[qmin]
                passive[j] = False
                if block == 1:
                    excluded[j] = True
                # columns found dependent on a set that included j may be independent of the rest
                for t in range(ndep):
                    excluded[dep[t]] = False
                ndep = 0
                chol_delete(L, k, qmin)
                for t in range(qmin, k - 1):
                    idx[t] = idx[t + 1]
                k -= 1
            if k == k0:
                block = 1
                continue
            block = block0
            k, it, status = _to_ls_solution(L, k, idx, z, passive, excluded, y, rhs, it, max_iter)
            if status:
                kst[0] = k
                return d, 1
        kst[0] = k
        if 1.0 - sz > 0.0:
            mn = np.inf
            for i in range(m):
                if marg[i] < mn:
                    mn = marg[i]
            if mn > 0.0:
                return d, 0
    return -1, 0
