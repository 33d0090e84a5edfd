"""numba kernels for alignment statistics. Arrays in, arrays out; no validation, no raise.

Determinism: every sum is accumulated in a fixed order (rows in order, per column), so the result
does not depend on the number of threads. Inputs may be float32 or float64; sums are float64.
"""
from __future__ import annotations

import numba
import numpy as np
from numba import prange

_COL_BLOCK = 64


@numba.njit(parallel=True)
def row_sq_norms(X):
    """Squared L2 norm of every row, accumulated in float64 (sequential within a row)."""
    n, d = X.shape
    out = np.empty(n, np.float64)
    for i in prange(n):
        s = 0.0
        for j in range(d):
            v = np.float64(X[i, j])
            s += v * v
        out[i] = s
    return out


@numba.njit(parallel=True)
def class_sums(X, codes, n_classes, inv_norms, S, U):
    """Add per-class sums of rows (S) and of unit rows (U, rows scaled by inv_norms) in place.

    Parallel over blocks of columns; within a column rows are added in order (deterministic).
    ``inv_norms[i]`` is 1/||x_i|| or 0 for a zero row.
    """
    n, d = X.shape
    n_blocks = (d + _COL_BLOCK - 1) // _COL_BLOCK
    for b in prange(n_blocks):
        j0 = b * _COL_BLOCK
        j1 = min(d, j0 + _COL_BLOCK)
        for i in range(n):
            c = codes[i]
            w = inv_norms[i]
            for j in range(j0, j1):
                v = np.float64(X[i, j])
                S[c, j] += v
                U[c, j] += v * w


@numba.njit(cache=True)
def pair_block(B, norms_i, norms_j, codes_i, codes_j, gamma, diag, sign_sum, pair_count,
               amb_i, amb_j, global_min):
    """Reduce one Gram block B[i, j] = <x_i, x_j> (computed by BLAS, possibly in float32).

    ``gamma`` bounds the relative rounding error of B: |B_ij - exact| <= gamma * n_i * n_j. Pairs
    whose sign is ambiguous under that bound are not counted but written to (amb_i, amb_j) for an
    exact float64 recomputation by the caller. ``diag``: the block is on the diagonal, so only j > i.
    Adds to sign_sum[c, c'] and pair_count[c, c'] (both orders for c != c', once for c == c').

    Returns (n_amb, min_upper, min_cos_upper): upper bounds of the minimum inner product and of the
    minimum cosine over the block's pairs (cosine only over non-zero rows).
    """
    bi, bj = B.shape
    cap = amb_i.shape[0]
    n_amb = 0
    min_upper = np.inf
    min_cos_upper = np.inf
    for i in range(bi):
        ci = codes_i[i]
        ni = norms_i[i]
        start = i + 1 if diag else 0
        for j in range(start, bj):
            cj = codes_j[j]
            nj = norms_j[j]
            b = np.float64(B[i, j])
            e = gamma * ni * nj
            up = b + e
            if up < min_upper:
                min_upper = up
            if ni > 0.0 and nj > 0.0:
                cu = up / (ni * nj)
                if cu < min_cos_upper:
                    min_cos_upper = cu
            if gamma > 0.0 and abs(b) <= e and e > 0.0:
                if n_amb < cap:
                    amb_i[n_amb] = i
                    amb_j[n_amb] = j
                n_amb += 1
                continue
            s = 1 if b > 0.0 else (-1 if b < 0.0 else 0)
            sign_sum[ci, cj] += s
            pair_count[ci, cj] += 1
            if ci != cj:
                sign_sum[cj, ci] += s
                pair_count[cj, ci] += 1
    return n_amb, min(min_upper, global_min), min_cos_upper


@numba.njit(cache=True)
def min_candidates(B, norms_i, norms_j, gamma, diag, threshold, cos_threshold, cand_i, cand_j):
    """Pairs whose lower bound (B - gamma n_i n_j) could beat ``threshold`` (inner product) or
    ``cos_threshold`` (cosine). Returns how many there are (only the first len(cand_i) are stored)."""
    bi, bj = B.shape
    cap = cand_i.shape[0]
    k = 0
    for i in range(bi):
        ni = norms_i[i]
        start = i + 1 if diag else 0
        for j in range(start, bj):
            nj = norms_j[j]
            lo = np.float64(B[i, j]) - gamma * ni * nj
            hit = lo <= threshold
            if not hit and ni > 0.0 and nj > 0.0:
                hit = lo / (ni * nj) <= cos_threshold
            if hit:
                if k < cap:
                    cand_i[k] = i
                    cand_j[k] = j
                k += 1
    return k
