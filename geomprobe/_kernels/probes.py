"""numba kernels for geomprobe.probes: plain arrays in, plain arrays out; no validation, no raise.

All accumulation is in float64 whatever the input dtype (float32 or float64): every element read is
cast with np.float64(...) so that this also holds with NUMBA_DISABLE_JIT=1 (numpy 2 keeps float32 in
float32 - python float arithmetic). Rows whose norm (after
optional centring) is zero are treated as having correlation 0 with everything; the kernels report
them through flags so that the Python layer can say what happened.
"""
from __future__ import annotations

import numpy as np
from numba import njit


@njit(cache=True)
def _row_mean(x, centre):
    if not centre:
        return 0.0
    s = 0.0
    for j in range(x.shape[0]):
        s += np.float64(x[j])
    return s / x.shape[0]


@njit(cache=True)
def class_direction_sums(X, codes, n_classes, centre):
    """S[c] = sum over rows i with codes[i] == c of (x_i - m_i) / ||x_i - m_i||.

    m_i is the mean of row i when ``centre`` (Pearson correlation), else 0 (cosine similarity).
    Returns (S (n_classes, D) float64, zero (n,) bool: rows of zero norm, left out of S).
    """
    n = X.shape[0]
    d = X.shape[1]
    S = np.zeros((n_classes, d), dtype=np.float64)
    zero = np.zeros(n, dtype=np.bool_)
    for i in range(n):
        m = _row_mean(X[i], centre)
        ss = 0.0
        for j in range(d):
            v = np.float64(X[i, j]) - m
            ss += v * v
        if ss == 0.0:
            zero[i] = True
            continue
        inv = 1.0 / np.sqrt(ss)
        c = codes[i]
        for j in range(d):
            S[c, j] += (np.float64(X[i, j]) - m) * inv
    return S, zero


@njit(cache=True)
def averaging_scores(T, S, centre):
    """scores[t, c] = <(t - m_t) / ||t - m_t||, S[c]>, the correlation-weighted class sums.

    Returns (scores (n, K) float64, pred (n,) int64: first argmax, zero (n,) bool). A zero-norm row
    gets all-zero scores and predicts class 0 (the smallest class code).
    """
    n = T.shape[0]
    d = T.shape[1]
    k = S.shape[0]
    scores = np.zeros((n, k), dtype=np.float64)
    pred = np.zeros(n, dtype=np.int64)
    zero = np.zeros(n, dtype=np.bool_)
    buf = np.empty(d, dtype=np.float64)
    for i in range(n):
        m = _row_mean(T[i], centre)
        ss = 0.0
        for j in range(d):
            v = np.float64(T[i, j]) - m
            buf[j] = v
            ss += v * v
        if ss == 0.0:
            zero[i] = True
            continue
        inv = 1.0 / np.sqrt(ss)
        best = 0
        for c in range(k):
            acc = 0.0
            for j in range(d):
                acc += buf[j] * S[c, j]
            acc *= inv
            scores[i, c] = acc
            if acc > scores[i, best]:
                best = c
        pred[i] = best
    return scores, pred, zero


@njit(cache=True)
def rowwise_correlation(A, B, centre):
    """out[i] = correlation of rows A[i] and B[i] (cosine, or Pearson when ``centre``).

    Returns (out (n,) float64, undefined (n,) bool). A row pair in which either row has zero norm is
    undefined: out is NaN there and the flag is set.
    """
    n = A.shape[0]
    d = A.shape[1]
    out = np.empty(n, dtype=np.float64)
    undefined = np.zeros(n, dtype=np.bool_)
    for i in range(n):
        ma = _row_mean(A[i], centre)
        mb = _row_mean(B[i], centre)
        saa = 0.0
        sbb = 0.0
        sab = 0.0
        for j in range(d):
            a = np.float64(A[i, j]) - ma
            b = np.float64(B[i, j]) - mb
            saa += a * a
            sbb += b * b
            sab += a * b
        if saa == 0.0 or sbb == 0.0:
            out[i] = np.nan
            undefined[i] = True
        else:
            out[i] = sab / (np.sqrt(saa) * np.sqrt(sbb))
    return out, undefined
