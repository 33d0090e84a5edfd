"""Participation ratio and effective rank of a layer's covariance spectrum.

With lambda_k the eigenvalues of the covariance of the centred rows of X (equivalently sigma_k^2 / n
with sigma_k the singular values of the centred X):

* participation ratio  PR = (sum_k lambda_k)^2 / sum_k lambda_k^2 = tr(C)^2 / ||C||_F^2   (1 <= PR <= rank)
* effective rank       erank = exp(-sum_k p_k log p_k),  p_k = sigma_k / sum_j sigma_j
  (Roy & Vetterli 2007; RankMe, Garrido et al. 2023, without RankMe's epsilon; ``center=False`` gives
  RankMe's uncentred version).

Both are computed from the d x d scatter matrix (one streaming pass, never n x n) when d <= n, and from
the n x n Gram matrix of the centred rows when d > n (the smaller of the two; same non-zero spectrum).
Both are invariant to a common scale, to orthogonal maps of the features and to reordering the rows;
the centred versions also to translations.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from . import _moments
from ._validation import check_matrix
from .registry import MetricInfo, register

__all__ = ["SpectrumResult", "spectrum", "participation_ratio", "effective_rank", "spectral_rows", "METRICS"]

METRICS = register({
    "participation_ratio": MetricInfo(
        "participation ratio (sum lambda)^2 / sum lambda^2 of the covariance spectrum", better="neither"),
    "effective_rank": MetricInfo(
        "effective rank exp(entropy of sigma / sum sigma), sigma = singular values of the centred layer",
        better="neither"),
})


@dataclass(frozen=True)
class SpectrumResult:
    """``eigenvalues``: the covariance spectrum (scatter / n), descending, float64, length min(n, d),
    values below max(n, d) * eps * the largest set to 0. ``center``: whether rows were centred."""

    participation_ratio: float
    effective_rank: float
    eigenvalues: np.ndarray
    n: int
    d: int
    center: bool
    notes: tuple[str, ...] = ()


def _second_moment(X: np.ndarray, center: bool) -> np.ndarray:
    """The smaller of the d x d scatter and the n x n Gram of the (centred) rows, float64."""
    n, d = X.shape
    mu = _moments.column_mean(X) if center else np.zeros(d)
    if d <= n:
        return _moments.centered_scatter(X, mu)
    Xc = (X - mu.astype(X.dtype)) if center else X
    G = (Xc @ Xc.T).astype(np.float64)
    return 0.5 * (G + G.T)


def _from_moment(S: np.ndarray, n: int, d: int, center: bool) -> SpectrumResult:
    with _moments.one_blas_thread():
        lam = np.linalg.eigvalsh(S)[::-1]
    # eigenvalues below rounding level (max(n, d) * eps * largest) are zero: their square roots (~1e-8 of
    # the largest singular value) would otherwise enter the entropy
    lam = np.where(lam > max(n, d) * np.finfo(np.float64).eps * max(lam[0], 0.0), lam, 0.0)
    notes = []
    tr = float(np.trace(S))
    fro2 = float(np.sum(S * S))
    if tr <= 0 or fro2 <= 0:
        notes.append("every row is the same vector (zero spectrum): participation ratio and effective rank undefined")
        return SpectrumResult(float("nan"), float("nan"), lam / n, n, d, center, tuple(notes))
    pr = tr * tr / fro2
    sig = np.sqrt(lam)
    p = sig / sig.sum()
    p = p[p > 0]
    er = float(np.exp(-np.sum(p * np.log(p))))
    return SpectrumResult(float(pr), er, lam / n, n, d, center, tuple(notes))


def spectrum(X, *, center: bool = True) -> SpectrumResult:
    """Participation ratio, effective rank and covariance eigenvalues of the rows of X (n x d; more
    dimensions are flattened). One streaming pass for the d x d scatter (d <= n) plus one symmetric
    eigendecomposition of the smaller side."""
    X = check_matrix(X, "X", flatten=True)
    n, d = X.shape
    return _from_moment(_second_moment(X, center), n, d, center)


def participation_ratio(X, *, center: bool = True) -> float:
    """(sum lambda)^2 / sum lambda^2 of the covariance of X's rows; needs no eigendecomposition."""
    X = check_matrix(X, "X", flatten=True)
    S = _second_moment(X, center)
    tr, fro2 = float(np.trace(S)), float(np.sum(S * S))
    return tr * tr / fro2 if fro2 > 0 else float("nan")


def effective_rank(X, *, center: bool = True) -> float:
    """exp(entropy of the normalised singular values of the (centred) X); RankMe's definition."""
    return spectrum(X, center=center).effective_rank


def spectral_rows(X) -> tuple[list[tuple[str, object, float]], list[str]]:
    """Rows (metric, None, value) for ``geomprobe analyze``: participation_ratio, effective_rank."""
    r = spectrum(X)
    return ([("participation_ratio", None, r.participation_ratio), ("effective_rank", None, r.effective_rank)],
            [f"spectral: {m}" for m in r.notes])
