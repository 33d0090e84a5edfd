"""Streaming first and second moments shared by the companion measures (spectral, collapse, linear
probe, similarity). Arrays in, arrays out; no validation (callers validate once at the boundary).

Products are taken chunk by chunk in the input's dtype (so float32 layers use float32 BLAS, like one
``X.T @ X``) and accumulated in float64; centring is done per chunk, so no centred copy of the whole
layer is made.
"""
from __future__ import annotations

import contextlib

import numpy as np

CHUNK_ROWS = 8192


def one_blas_thread():
    """Context for the dense d x d factorisations (eigvalsh, SVD): their Householder reductions are
    memory-bound BLAS-2, and with the BLAS pool on a busy 2-core machine they ran 7x slower than on one
    thread (numpy eigvalsh of 1536 x 1536 at load 15: 96 s on 2 threads, 13.6 s on 1). No-op without
    threadpoolctl."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # pragma: no cover - threadpoolctl is a dependency
        return contextlib.nullcontext()
    return threadpool_limits(limits=1, user_api="blas")


def blocks(X: np.ndarray, rows: np.ndarray | None = None, chunk_rows: int = CHUNK_ROWS):
    """(start, block) over X's rows, or over X[rows] without copying more than one chunk."""
    n = X.shape[0] if rows is None else rows.size
    for a in range(0, n, chunk_rows):
        yield a, (X[a:a + chunk_rows] if rows is None else X[rows[a:a + chunk_rows]])


def column_mean(X: np.ndarray, chunk_rows: int = CHUNK_ROWS, *, rows: np.ndarray | None = None) -> np.ndarray:
    """Column means (of X[rows]) in float64 (accumulated per chunk)."""
    s = np.zeros(X.shape[1])
    for _, b in blocks(X, rows, chunk_rows):
        s += b.sum(axis=0, dtype=np.float64)
    return s / (X.shape[0] if rows is None else rows.size)


def centered_scatter(X: np.ndarray, mean: np.ndarray | None = None, *, chunk_rows: int = CHUNK_ROWS,
                     row_sq: bool = False, rows: np.ndarray | None = None):
    """S = sum_i (x_i - mu)(x_i - mu)^T (d x d, float64) over X (or X[rows]) without a centred copy.

    With ``row_sq`` also returns ||x_i - mu||^2 for every row (float64)."""
    n = X.shape[0] if rows is None else rows.size
    d = X.shape[1]
    mu = column_mean(X, chunk_rows, rows=rows) if mean is None else mean
    mu_c = mu.astype(X.dtype)
    S = np.zeros((d, d))
    sq = np.empty(n) if row_sq else None
    for a, b in blocks(X, rows, chunk_rows):
        c = b - mu_c
        S += c.T @ c  # syrk in X's dtype
        if row_sq:
            sq[a:a + c.shape[0]] = np.einsum("ij,ij->i", c, c, dtype=np.float64)
    S = 0.5 * (S + S.T)
    return (S, sq) if row_sq else S


def centered_cross(X: np.ndarray, Y: np.ndarray, mx: np.ndarray, my: np.ndarray, *,
                   chunk_rows: int = CHUNK_ROWS) -> np.ndarray:
    """sum_i (x_i - mx)(y_i - my)^T (dx x dy, float64), chunk by chunk."""
    n = X.shape[0]
    dt = np.result_type(X.dtype, Y.dtype)
    M = np.zeros((X.shape[1], Y.shape[1]))
    mxc, myc = mx.astype(dt), my.astype(dt)
    for a in range(0, n, chunk_rows):
        M += (X[a:a + chunk_rows].astype(dt, copy=False) - mxc).T @ (Y[a:a + chunk_rows].astype(dt, copy=False) - myc)
    return M


def weighted_sums(X: np.ndarray, Wt: np.ndarray, rows: np.ndarray | None = None,
                  chunk_rows: int = CHUNK_ROWS) -> np.ndarray:
    """sum_i Wt[i] x_i^T (k x d, float64) for Wt (n x k) over X (or X[rows]); products in X's dtype."""
    out = np.zeros((Wt.shape[1], X.shape[1]))
    for a, b in blocks(X, rows, chunk_rows):
        out += Wt[a:a + b.shape[0]].astype(b.dtype).T @ b
    return out


def class_means(X: np.ndarray, codes: np.ndarray, K: int, shift: np.ndarray | None = None,
                chunk_rows: int = CHUNK_ROWS):
    """(K x d float64 class means of X - shift, K int64 counts) for codes 0..K-1 (every class non-empty)."""
    n, d = X.shape
    S = np.zeros((K, d))
    sh = None if shift is None else shift.astype(X.dtype)
    for a in range(0, n, chunk_rows):
        block, cb = X[a:a + chunk_rows], codes[a:a + chunk_rows]
        if sh is not None:
            block = block - sh
        onehot = np.zeros((K, block.shape[0]), dtype=block.dtype)
        onehot[cb, np.arange(block.shape[0])] = 1.0
        S += onehot @ block  # per-chunk sums in X's dtype (BLAS), accumulated in float64
    counts = np.bincount(codes, minlength=K).astype(np.int64)
    return S / counts[:, None], counts
