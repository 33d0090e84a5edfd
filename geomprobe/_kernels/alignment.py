"""numba kernels for alignment statistics. Arrays in, arrays out; no validation, no raise.

Determinism: every sum is accumulated in a fixed order (rows in order, per column), so the result
does not depend on the number of threads. Inputs may be float32 or float64; sums are float64.
"""
from __future__ import annotations

import numba
import numpy as np
from numba import prange



@numba.njit(parallel=True, cache=True)
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


CHUNK_ROWS = 512


@numba.njit(parallel=True, cache=True)
def class_sums(X, codes, n_classes, group, S, U, sq_norms):
    """One pass over X: per-class sums of rows (S) and of unit rows (U), and each row's squared norm.

    Rows are cut into fixed chunks of CHUNK_ROWS; ``group`` chunks are reduced in parallel into
    private partial sums, which are then added to S and U in chunk order. The chunking does not
    depend on the thread count, so neither does the result (bit for bit). Zero rows add nothing to U.
    """
    n, d = X.shape
    n_chunks = (n + CHUNK_ROWS - 1) // CHUNK_ROWS
    for g0 in range(0, n_chunks, group):
        g1 = min(n_chunks, g0 + group)
        PS = np.zeros((g1 - g0, n_classes, d))
        PU = np.zeros((g1 - g0, n_classes, d))
        for cc in prange(g1 - g0):
            r0 = (g0 + cc) * CHUNK_ROWS
            r1 = min(n, r0 + CHUNK_ROWS)
            for i in range(r0, r1):
                # four interleaved partial sums (fixed order): breaks the add latency chain
                s0 = 0.0
                s1 = 0.0
                s2 = 0.0
                s3 = 0.0
                d4 = d - d % 4
                for j in range(0, d4, 4):
                    v0 = np.float64(X[i, j])
                    v1 = np.float64(X[i, j + 1])
                    v2 = np.float64(X[i, j + 2])
                    v3 = np.float64(X[i, j + 3])
                    s0 += v0 * v0
                    s1 += v1 * v1
                    s2 += v2 * v2
                    s3 += v3 * v3
                for j in range(d4, d):
                    v0 = np.float64(X[i, j])
                    s0 += v0 * v0
                sq = (s0 + s1) + (s2 + s3)
                sq_norms[i] = sq
                w = 1.0 / np.sqrt(sq) if sq > 0.0 else 0.0
                # the row is still in L1: accumulate it now (rows added in order per element)
                c = codes[i]
                ps = PS[cc, c]
                pu = PU[cc, c]
                for j in range(d):
                    v = np.float64(X[i, j])
                    ps[j] += v
                    pu[j] += v * w
        for cc in range(g1 - g0):
            for c in range(n_classes):
                for j in range(d):
                    S[c, j] += PS[cc, c, j]
                    U[c, j] += PU[cc, c, j]


@numba.njit(cache=True)
def pair_block(B, norms_i, inv_i, inv_j, gnorm_j, codes_i, seg_start, seg_end, seg_class, gamma, diag,
               threshold, cos_threshold, sign_sum, pair_count, amb_i, amb_j, cand_i, cand_j):
    """One pass over a Gram block B[i, j] = <x_i, x_j> (computed by BLAS, maybe in float32).

    Columns j come sorted by class: segment s covers j in [seg_start[s], seg_end[s]) of class
    seg_class[s]. ``gamma`` bounds the rounding error: |B_ij - exact| <= gamma n_i n_j
    (``gnorm_j`` = gamma * n_j). ``diag``: the block is on the diagonal, so only j > i.

    Signs: pairs whose sign is certain under the bound are added to sign_sum[c, c'] and
    pair_count[c, c'] (both orders for c != c', once for c == c'); the others are written to
    (amb_i, amb_j) for an exact float64 recomputation by the caller.
    Minimum: pairs whose lower bound B - gamma n_i n_j could be <= ``threshold`` (inner product) or
    whose lower-bound cosine could be <= ``cos_threshold`` are written to (cand_i, cand_j).
    ``inv_*`` = 1/norm, NaN for zero rows (never cosine candidates).
    The hot loop over 64-column chunks only counts (branch-free, vectorised); a chunk is rescanned
    only when it holds an ambiguous sign or a candidate. Returns (n_amb, n_cand); pairs beyond the
    buffers' length are counted but not stored (the caller then recomputes the block exactly).
    """
    bi = B.shape[0]
    cap = amb_i.shape[0]
    n_amb = 0
    n_cand = 0
    for i in range(bi):
        ci = codes_i[i]
        ni = norms_i[i]
        ii = inv_i[i]
        for s in range(seg_start.shape[0]):
            j0 = seg_start[s]
            j1 = seg_end[s]
            if diag and j0 < i + 1:
                j0 = i + 1
            if j1 <= j0:
                continue
            cj = seg_class[s]
            pos = 0
            neg = 0
            counted = 0
            for k0 in range(j0, j1, 64):
                k1 = min(j1, k0 + 64)
                p = 0
                q = 0
                h = 0
                for j in range(k0, k1):  # branch-free integer reductions: vectorised by LLVM
                    b = np.float64(B[i, j])
                    e = ni * gnorm_j[j]
                    lo = b - e
                    p += b > e
                    q += b < -e
                    h += (lo <= threshold) + (lo * ii * inv_j[j] <= cos_threshold)
                pos += p
                neg += q
                amb = (k1 - k0) - p - q
                if h or (amb and gamma > 0.0):
                    for j in range(k0, k1):
                        b = np.float64(B[i, j])
                        e = ni * gnorm_j[j]
                        lo = b - e
                        if gamma > 0.0 and not (b > e or b < -e):
                            if n_amb < cap:
                                amb_i[n_amb] = i
                                amb_j[n_amb] = j
                            n_amb += 1
                        if lo <= threshold or lo * ii * inv_j[j] <= cos_threshold:
                            if n_cand < cap:
                                cand_i[n_cand] = i
                                cand_j[n_cand] = j
                            n_cand += 1
                if amb and gamma > 0.0:
                    counted += p + q
                else:
                    counted += k1 - k0  # exact zeros (gamma == 0) count with sign 0
            ssum = pos - neg
            sign_sum[ci, cj] += ssum
            pair_count[ci, cj] += counted
            if ci != cj:
                sign_sum[cj, ci] += ssum
                pair_count[cj, ci] += counted
    return n_amb, n_cand


@numba.njit(cache=True)
def exact_dots(Xi, Xj, I, J):
    """<Xi[I[k]], Xj[J[k]]> for every k, accumulated in float64 from the stored values."""
    out = np.empty(I.shape[0])
    d = Xi.shape[1]
    for k in range(I.shape[0]):
        a = I[k]
        b = J[k]
        s = 0.0
        for t in range(d):
            s += np.float64(Xi[a, t]) * np.float64(Xj[b, t])
        out[k] = s
    return out
