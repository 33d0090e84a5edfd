"""Shared steps of the exact active-set NNLS solvers (Lawson & Hanson) used by the MFTMA kernels.

Both MFTMA solvers keep the passive (non-zero) set of an NNLS problem as a lower-triangular
Cholesky factor L of its Gram block, in the order the columns entered (row q of L belongs to
passive column idx[q]):

- :mod:`.mftma_anchors`: the anchor dual  min_{z >= 0} ||sD1 z - t'||^2  on a Gram matrix formed
  once per manifold;
- :mod:`.mftma_simcap`: the separability test  min_{z >= 0} ||sum z_i [a_i; 1] - e||^2, Gram rows
  computed on the fly.

The steps here are the ones they share: append a column to L with a pivot test (a column whose
pivot is below DEP_TOL of its squared norm lies in the span of the passive columns, to rounding, and
is refused: singular Gram matrices are harmless), solve with L L^T, delete a column by Givens
rotations, the Lawson-Hanson step towards the least-squares solution, and dropping the columns that
reached zero. Each step has a plain-numpy twin in tests/test_mftma_anchors_scale.py.

Two arithmetic variants of append/solve exist on purpose: ``chol_append`` / ``chol_solve`` (plain
sequential sums; the anchor solver and hull_nnls) and ``chol_append_rows`` / ``chol_solve_rows``
(row-wise sums that the compiler may vectorise; the warm-started scan of simcap, which solves far
larger passive sets). Each caller keeps the variant it was validated with, so results are unchanged
bit for bit by this module's introduction.

Kernels never raise and run unchanged with NUMBA_DISABLE_JIT=1.
"""
from __future__ import annotations

import numpy as np
from numba import njit

#: A column whose Cholesky pivot^2 is at most DEP_TOL times its squared norm is not added.
DEP_TOL = 1e-11


@njit(cache=True, nogil=True)
def accept_or_step(y, z, idx, k):
    """Lawson-Hanson inner step on the passive set idx[:k] with least-squares solution y.

    If every y is positive, accept it (z[idx] = y) and return True. Otherwise move z towards y
    until the first passive variable hits zero (that one is set to exactly 0) and return False;
    the caller then drops the passive columns that reached zero.
    """
    ok = True
    for q in range(k):
        if y[q] <= 0.0:
            ok = False
            break
    if ok:
        for q in range(k):
            z[idx[q]] = y[q]
        return True
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
    return False


@njit(cache=True, nogil=True)
def chol_append(L, k, grow, gjj):
    """Row k of L for a new column with Gram entries grow[:k] (against the passive columns, in
    Cholesky order) and squared norm gjj. Returns True and sets L[k, k] if the pivot test passes;
    False (L[k, k] untouched) if the column is dependent on the passive set."""
    for r in range(k):
        acc = grow[r]
        for c in range(r):
            acc -= L[r, c] * L[k, c]
        L[k, r] = acc / L[r, r]
    d2 = gjj
    for c in range(k):
        d2 -= L[k, c] * L[k, c]
    if d2 > DEP_TOL * gjj and d2 > 0.0:
        L[k, k] = np.sqrt(d2)
        return True
    return False


@njit(cache=True, nogil=True)
def chol_solve(L, k, rhs, y):
    """Solve (L L^T) y = rhs for the leading k x k block of L (sequential sums)."""
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


@njit(cache=True, nogil=True, fastmath={"reassoc", "contract"})
def dot_rows(a, b, n):
    """a[:n] . b[:n], vectorised (the compiler may reassociate the sum: the order is fixed by the
    compiled code, so results are the same run to run on one machine)."""
    s = 0.0
    for c in range(n):
        s += a[c] * b[c]
    return s


@njit(cache=True, nogil=True)
def chol_append_rows(L, k, grow, gjj):
    """chol_append with row-wise vectorised sums (dot_rows); same contract."""
    Lk = L[k]
    for q in range(k):
        Lk[q] = (grow[q] - dot_rows(L[q], Lk, q)) / L[q, q]
    d2 = gjj - dot_rows(Lk, Lk, k)
    if d2 > DEP_TOL * gjj and d2 > 0.0:
        L[k, k] = np.sqrt(d2)
        return True
    return False


@njit(cache=True, nogil=True)
def chol_solve_rows(L, k, rhs, y):
    """y = (L L^T)^-1 rhs over the first k rows (forward substitution by rows, backward by
    columns of L^T = rows of L, so both sweep contiguous memory)."""
    for r in range(k):
        y[r] = (rhs[r] - dot_rows(L[r], y, r)) / L[r, r]
    for r in range(k - 1, -1, -1):
        yr = y[r] / L[r, r]
        y[r] = yr
        Lr = L[r]
        for c in range(r):
            y[c] -= Lr[c] * yr


@njit(cache=True, nogil=True)
def chol_delete(L, k, q):
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
def drop_zeros(L, k, idx, z, passive, excluded):
    """Drop the passive columns whose coefficient reached zero (Givens downdates of the Cholesky
    factor L[:k, :k], idx kept in Cholesky order) and re-admit every excluded column. Returns the new k."""
    for q in range(k - 1, -1, -1):
        i = idx[q]
        if not z[i] > 0.0:
            z[i] = 0.0
            passive[i] = False
            chol_delete(L, k, q)
            for t in range(q, k - 1):
                idx[t] = idx[t + 1]
            k -= 1
    excluded[:] = False
    return k
