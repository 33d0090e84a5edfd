"""Neural collapse measures of a layer (Papyan, Han & Donoho 2020).

With class means mu_c, mu_G = the mean of the class means, the centred means M = [mu_c - mu_G] (C x d),
Sigma_W = (1/n) sum_i (x_i - mu_{y_i})(x_i - mu_{y_i})^T and Sigma_B = (1/C) M^T M:

* NC1 = tr(Sigma_W Sigma_B^+) / C  (within-class variability relative to the between-class spread; -> 0).
  With M = U S V^T, Sigma_B^+ = V diag(C / s_k^2) V^T over s_k > max(C, d) * eps * s_max, so
  tr(Sigma_W Sigma_B^+) = sum_k (C / s_k^2) ||(X - M_y) v_k||^2 / n: one pass X @ V (n x rank), no d x d.
* NC2 equinorm = std_c ||mu_c - mu_G|| / mean_c ||mu_c - mu_G||  (-> 0);
  NC2 equiangularity = std over c != c' of cos(mu_c - mu_G, mu_c' - mu_G)  (-> 0);
  NC2 max-angle = mean over c != c' of |cos + 1/(C-1)|  (-> 0 for a simplex ETF).
* NC3 (with the last layer's weights W, C x d, rows in class-id order) = || W/||W||_F - M/||M||_F ||_F^2.
* NC4 (with the network's logits, n x C) = fraction of rows whose argmax logit differs from the nearest
  class mean's class.

All are invariant to a common scale, orthogonal maps and translations of the features (NC3 and NC4
only when W and the logits move with them), to reordering rows and to renaming classes.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from . import _moments
from ._validation import InputError, check_labels, check_matrix, encode_labels
from .registry import MetricInfo, register

__all__ = ["CollapseResult", "neural_collapse", "collapse_rows", "METRICS"]

METRICS = register({
    "nc1": MetricInfo("neural collapse NC1 = tr(Sigma_W Sigma_B^+) / C", better="lower"),
    "nc2_equinorm": MetricInfo("NC2: coefficient of variation of the centred class-mean norms", better="lower"),
    "nc2_equiangular": MetricInfo("NC2: std of the pairwise cosines of the centred class means", better="lower"),
    "nc2_maxangle": MetricInfo("NC2: mean |cos + 1/(C-1)| over pairs of centred class means", better="lower"),
    "nc3": MetricInfo("NC3: ||W/||W|| - M/||M|| ||_F^2 (last-layer weights vs centred class means)",
                      better="lower"),
    "nc4": MetricInfo("NC4: fraction of rows where argmax logit != nearest class mean", better="lower"),
})


@dataclass(frozen=True)
class CollapseResult:
    """NC1-NC4 of one layer (nc3 / nc4 are NaN unless weights / logits were given)."""

    nc1: float
    nc2_equinorm: float
    nc2_equiangular: float
    nc2_maxangle: float
    nc3: float
    nc4: float
    classes: np.ndarray
    rank_between: int
    notes: tuple[str, ...] = ()


def neural_collapse(X, labels, *, weights=None, logits=None) -> CollapseResult:
    """NC1, NC2 (and NC3 / NC4 with ``weights`` (C_total x d, row = class id) / ``logits`` (n x C_total,
    column = class id)) of the rows of X grouped by ``labels``. Needs >= 2 classes."""
    X = check_matrix(X, "X", flatten=True)
    labels = check_labels(labels, X.shape[0])
    classes, codes = encode_labels(labels)
    C = classes.size
    if C < 2:
        raise InputError(f"neural collapse needs at least 2 classes, labels contain {C}")
    n, d = X.shape
    W = L = None
    if weights is not None:
        W = check_matrix(weights, "weights")
        if W.shape[1] != d:
            raise InputError(f"weights has {W.shape[1]} columns but X has {d} features")
        if classes.min() < 0 or classes.max() >= W.shape[0]:
            raise InputError(f"weights has {W.shape[0]} rows but labels hold class id {int(classes.max())} "
                             f"(min {int(classes.min())}); row c of weights is class c")
    if logits is not None:
        L = check_matrix(logits, "logits")
        if L.shape[0] != n:
            raise InputError(f"logits has {L.shape[0]} rows but X has {n} rows")
        if classes.min() < 0 or classes.max() >= L.shape[1]:
            raise InputError(f"logits has {L.shape[1]} columns but labels hold class id {int(classes.max())} "
                             f"(min {int(classes.min())}); column c of logits is class c")
    notes: list[str] = []
    g = _moments.column_mean(X)  # class means are taken of X - g (no cancellation for shifted data)
    mu_s, counts = _moments.class_means(X, codes, C, shift=g)
    M = mu_s - mu_s.mean(axis=0)
    # NC1 through the between-class basis; M has rank <= C - 1 (its rows sum to 0)
    U, s, Vt = np.linalg.svd(M, full_matrices=False)
    tol = max(C, d) * np.finfo(np.float64).eps * (s[0] if s.size else 0.0)
    keep = (s > tol) & (np.arange(s.size) < C - 1)
    r = int(keep.sum())
    if r == 0:
        notes.append("all class means coincide (Sigma_B = 0): NC1 undefined")
        nc1 = float("nan")
    else:
        V = Vt[keep].T  # d x r
        w = np.zeros(r)
        MV = mu_s @ V  # C x r
        Vx, gx = V.astype(X.dtype), g.astype(X.dtype)
        for a in range(0, n, _moments.CHUNK_ROWS):
            P = ((X[a:a + _moments.CHUNK_ROWS] - gx) @ Vx).astype(np.float64) - MV[codes[a:a + _moments.CHUNK_ROWS]]
            w += np.einsum("ij,ij->j", P, P)
        nc1 = float(np.sum(C / s[keep] ** 2 * (w / n)) / C)
    norms = np.linalg.norm(M, axis=1)
    mean_norm = norms.mean()
    equinorm = float(norms.std() / mean_norm) if mean_norm > 0 else float("nan")
    off = ~np.eye(C, dtype=bool)
    if np.all(norms > 0):
        Mu = M / norms[:, None]
        cos = (Mu @ Mu.T)[off]
        equiang = float(cos.std())
        maxang = float(np.mean(np.abs(cos + 1.0 / (C - 1))))
    else:
        notes.append(f"{int(np.sum(norms == 0))} class mean(s) equal the mean of means: NC2 angles undefined")
        equiang = maxang = float("nan")
    nc3 = nc4 = float("nan")
    if W is not None:
        Wc = W[classes].astype(np.float64)
        nw, nm = np.linalg.norm(Wc), np.linalg.norm(M)
        if nw > 0 and nm > 0:
            nc3 = float(np.sum((Wc / nw - M / nm) ** 2))
        else:
            notes.append("weights or class means are all zero: NC3 undefined")
    if L is not None:
        sq = np.einsum("ij,ij->i", mu_s, mu_s)
        mismatch = 0
        mux, gx = mu_s.astype(X.dtype), g.astype(X.dtype)
        for a in range(0, n, _moments.CHUNK_ROWS):
            blk = X[a:a + _moments.CHUNK_ROWS] - gx
            ncc = classes[np.argmin(sq[None, :] - 2.0 * (blk @ mux.T), axis=1)]
            net = np.argmax(L[a:a + _moments.CHUNK_ROWS], axis=1)
            mismatch += int(np.sum(ncc != net))
        nc4 = mismatch / n
    return CollapseResult(nc1, equinorm, equiang, maxang, nc3, nc4, classes, r, tuple(notes))


def collapse_rows(X, labels, *, weights=None, logits=None) -> tuple[list[tuple[str, object, float]], list[str]]:
    """Rows (metric, None, value) for ``geomprobe analyze``: nc1, nc2_*, and nc3 / nc4 when given."""
    r = neural_collapse(X, labels, weights=weights, logits=logits)
    rows = [("nc1", None, r.nc1), ("nc2_equinorm", None, r.nc2_equinorm),
            ("nc2_equiangular", None, r.nc2_equiangular), ("nc2_maxangle", None, r.nc2_maxangle)]
    if weights is not None:
        rows.append(("nc3", None, r.nc3))
    if logits is not None:
        rows.append(("nc4", None, r.nc4))
    return rows, [f"neural collapse: {m}" for m in r.notes]
