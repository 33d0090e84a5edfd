"""Similarity of two representations of the same examples: linear CKA and the Procrustes angle.

For X (n x p) and Y (n x q) with centred columns Xc, Yc, K = Xc Xc^T, L = Yc Yc^T, k_i = K_ii, l_i = L_ii:

* linear CKA (Kornblith et al. 2019), biased HSIC:
  CKA = ||Xc^T Yc||_F^2 / (||Xc^T Xc||_F ||Yc^T Yc||_F)
* unbiased HSIC (Song et al. 2012; CKA with it: Nguyen et al. 2021), written in feature space:
  HSIC_1(X, Y) = [||Xc^T Yc||_F^2 - sum k_i l_i + (sum k)(sum l)/((n-1)(n-2)) - 2 sum k_i l_i/(n-2)] / (n(n-3)),
  CKA_1 = HSIC_1(X, Y) / sqrt(HSIC_1(X, X) HSIC_1(Y, Y))   (needs n >= 4; an estimate, may leave [0, 1])
* Procrustes angular distance (Williams et al. 2021, netrep's LinearMetric(alpha=1, score_method='angular')):
  theta = arccos( ||Xc^T Yc||_* / (||Xc||_F ||Yc||_F) ) in [0, pi/2]; zero-padding of the narrower side
  is implicit (the nuclear norm of the p x q cross-covariance).

Everything comes from the p x q cross-covariance and the p x p, q x q scatters (streaming, never
n x n) when the layers are narrower than n. A layer wider than n is first reduced exactly to n columns
(Xc Q with Q from a QR of Xc^T: the same Gram matrix, and all three measures depend only on
orthogonally invariant quantities). When n > ``max_gram_n`` as well, CKA_1 is estimated from seeded
minibatches (sum of per-batch HSIC_1, as torch-cka does) and the other two are not computed (noted).

All three are invariant to orthogonal maps, common scales and translations of either side and to
reordering the examples (both sides together); CKA is 1 and theta is 0 for Y = c X Q + v.
"""
from __future__ import annotations

import csv
import io
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from . import _moments
from ._validation import InputError, check_choice, check_matrix, check_positive_int, check_seed
from .registry import MetricInfo, register

__all__ = ["SimilarityResult", "layer_similarity", "linear_cka", "procrustes_distance", "similarity_rows",
           "similarity_csv", "write_similarity_csv", "SIMILARITY_FIELDS", "METRICS", "prepare_layer",
           "PreparedLayer", "nuclear_norm"]

SIMILARITY_FIELDS = ("file_a", "layer_a", "file_b", "layer_b", "metric", "value")

METRICS = register({
    "cka": MetricInfo("linear CKA (biased HSIC) between two layers / files (similarity.csv)", better="neither"),
    "cka_unbiased": MetricInfo("linear CKA with the unbiased HSIC estimator (similarity.csv)", better="neither"),
    "procrustes_angle": MetricInfo("orthogonal Procrustes angular distance in radians (similarity.csv)",
                                   better="neither"),
})


@dataclass(frozen=True)
class PreparedLayer:
    """One side of a comparison: the (possibly reduced) layer, its column mean and self terms."""

    Z: np.ndarray = field(repr=False)  # n x d' (raw rows when d <= n; Xc Q when reduced)
    mean: np.ndarray = field(repr=False)  # column mean of Z (zeros when reduced)
    fro2: float  # ||Zc^T Zc||_F^2
    trace: float  # ||Zc||_F^2
    row_sq: np.ndarray = field(repr=False)  # ||z_i - mean||^2
    n: int
    d: int  # original width
    reduced: bool


@dataclass(frozen=True)
class SimilarityResult:
    cka: float
    cka_unbiased: float
    procrustes_angle: float
    n: int
    method: str  # "feature" (exact) or "minibatch" (cka_unbiased estimated)
    notes: tuple[str, ...] = ()


def prepare_layer(X: np.ndarray) -> PreparedLayer:
    """Self terms of a validated layer (n x d, float32/64). Wider than n: reduced to n columns by QR."""
    n, d = X.shape
    mu = _moments.column_mean(X)
    if d > n:
        Xc = X.astype(np.float64) - mu
        R = np.linalg.qr(Xc.T, mode="r")  # n x n, Xc = R^T Q^T
        X, mu, reduced = np.ascontiguousarray(R.T), np.zeros(R.shape[0]), True
    else:
        reduced = False
    S, sq = _moments.centered_scatter(X, mu, row_sq=True)
    return PreparedLayer(X, mu, float(np.sum(S * S)), float(np.trace(S)), sq, n, d, reduced)


def _hsic1(cross2: float, k: np.ndarray, l: np.ndarray, n: int) -> float:
    kl = float(np.dot(k, l))
    return (cross2 - kl + float(k.sum()) * float(l.sum()) / ((n - 1) * (n - 2)) - 2.0 * kl / (n - 2)) / (n * (n - 3))


def _pair(a: PreparedLayer, b: PreparedLayer, *, procrustes: bool = True) -> tuple[float, float, float]:
    M = _moments.centered_cross(a.Z, b.Z, a.mean, b.mean)
    cross2 = float(np.sum(M * M))
    den = math.sqrt(a.fro2 * b.fro2)
    cka = cross2 / den if den > 0 else float("nan")
    n = a.n
    if n >= 4:
        hxx, hyy = _hsic1(a.fro2, a.row_sq, a.row_sq, n), _hsic1(b.fro2, b.row_sq, b.row_sq, n)
        hxy = _hsic1(cross2, a.row_sq, b.row_sq, n)
        cka1 = hxy / math.sqrt(hxx * hyy) if hxx > 0 and hyy > 0 else float("nan")
    else:
        cka1 = float("nan")
    ang = float("nan")
    if procrustes and a.trace > 0 and b.trace > 0:
        tol = 1e-11 if np.result_type(a.Z.dtype, b.Z.dtype) == np.float64 else 1e-8
        nuc = nuclear_norm(M, rel_tol=tol)
        ang = math.acos(min(1.0, max(-1.0, nuc / math.sqrt(a.trace * b.trace))))
    return cka, cka1, ang


def nuclear_norm(M: np.ndarray, *, rel_tol: float = 1e-11) -> float:
    """Sum of the singular values of M (float64), from the eigenvalues of the smaller Gram matrix
    G = M^T M (or M M^T): one BLAS-3 product and a symmetric ``eigvalsh`` (half the flops of the SVD's
    bidiagonalisation, a third of its time measured on 4,096^2). With m the product's inner dimension
    and k the order of G, each computed eigenvalue lies within the rounding estimate
    delta = 4 eps (sqrt(m) tr(G) + k ||G||_2) of the exact one, so the sum of square roots is within
    E = sum_k sqrt(lam_k + delta) - sqrt(max(lam_k - delta, 0)) of the nuclear norm. When E exceeds
    ``rel_tol`` times it (tiny singular values, whose square roots the squaring makes inaccurate) the
    nuclear norm is taken from the SVD instead."""
    G = M.T @ M if M.shape[1] <= M.shape[0] else M @ M.T
    m = max(M.shape)
    with _moments.one_blas_thread():
        lam = np.linalg.eigvalsh(0.5 * (G + G.T))
    top = max(float(lam[-1]), 0.0)
    delta = 4.0 * np.finfo(np.float64).eps * (math.sqrt(m) * float(np.trace(G)) + lam.size * top)
    nuc = float(np.sqrt(np.maximum(lam, 0.0)).sum())
    err = float(np.sum(np.sqrt(lam + delta) - np.sqrt(np.maximum(lam - delta, 0.0)))) if top > 0 else 0.0
    if err <= rel_tol * nuc:
        return nuc
    with _moments.one_blas_thread():
        return float(np.linalg.svd(M, compute_uv=False).sum())


def _minibatch_cka(X: np.ndarray, Y: np.ndarray, batch_size: int, rng: np.random.Generator) -> float:
    order = rng.permutation(X.shape[0])
    hxy = hxx = hyy = 0.0
    for s in range(0, order.size - 3, batch_size):
        r = np.sort(order[s:s + batch_size])
        if r.size < 4:
            break
        a, b = prepare_layer(X[r]), prepare_layer(Y[r])
        M = _moments.centered_cross(a.Z, b.Z, a.mean, b.mean)
        m = r.size
        hxy += _hsic1(float(np.sum(M * M)), a.row_sq, b.row_sq, m)
        hxx += _hsic1(a.fro2, a.row_sq, a.row_sq, m)
        hyy += _hsic1(b.fro2, b.row_sq, b.row_sq, m)
    return hxy / math.sqrt(hxx * hyy) if hxx > 0 and hyy > 0 else float("nan")


def _check_pair(X, Y):
    X = check_matrix(X, "X", flatten=True)
    Y = check_matrix(Y, "Y", flatten=True)
    if X.shape[0] != Y.shape[0]:
        raise InputError(f"Y has {Y.shape[0]} rows but X has {X.shape[0]} rows (the same examples are needed)")
    return X, Y


def layer_similarity(X, Y, *, max_gram_n: int = 16384, batch_size: int = 4096, seed=0,
                     procrustes: bool = True) -> SimilarityResult:
    """Linear CKA (biased and unbiased) and the Procrustes angle between the rows of X and of Y (same
    examples, same order). Exact unless a layer is wider than n and n > ``max_gram_n`` (then minibatch).
    ``procrustes=False`` skips the SVD of the cross-covariance (the angle is then NaN)."""
    X, Y = _check_pair(X, Y)
    check_positive_int(max_gram_n, "max_gram_n", minimum=4)
    check_positive_int(batch_size, "batch_size", minimum=4)
    n = X.shape[0]
    notes = []
    if n < 2:
        raise InputError(f"X must have at least 2 rows to compare representations, got {n}")
    if max(X.shape[1], Y.shape[1]) > n and n > max_gram_n:
        cka1 = _minibatch_cka(X, Y, batch_size, check_seed(seed))
        notes.append(f"a layer is wider than n = {n} > max_gram_n = {max_gram_n}: cka_unbiased estimated from "
                     f"minibatches of {batch_size}; cka and procrustes_angle not computed")
        return SimilarityResult(float("nan"), cka1, float("nan"), n, "minibatch", tuple(notes))
    a, b = prepare_layer(X), prepare_layer(Y)
    cka, cka1, ang = _pair(a, b, procrustes=procrustes)
    if n < 4:
        notes.append(f"cka_unbiased needs n >= 4, got {n}")
    if a.trace == 0 or b.trace == 0:
        notes.append("a layer is constant over the examples: CKA and the Procrustes angle are undefined")
    return SimilarityResult(cka, cka1, ang, n, "feature", tuple(notes))


def linear_cka(X, Y, *, unbiased: bool = False) -> float:
    """Linear CKA between the rows of X and Y (1 for Y = c X Q + v); see the module docstring."""
    r = layer_similarity(X, Y, procrustes=False)
    return r.cka_unbiased if unbiased else r.cka


def procrustes_distance(X, Y) -> float:
    """Orthogonal Procrustes angular distance arccos(||Xc^T Yc||_* / (||Xc|| ||Yc||)), radians."""
    return layer_similarity(X, Y).procrustes_angle


# -- between layers and files ---------------------------------------------------------------------
def similarity_rows(files, *, layers=None, subset: str | None = None, scope: str = "all",
                    max_gram_n: int = 16384) -> tuple[list[dict], list[str]]:
    """Long-format rows (file_a, layer_a, file_b, layer_b, metric, value) for every unordered pair of
    distinct (file, layer) in file order then layer order (a before b; the diagonal, CKA 1 and angle 0,
    is not written). ``scope``: 'all' pairs, 'layers' (pairs within each file) or 'files' (the same
    layer across files). ``subset``: a subset name of the files (e.g. 'test'); None: every row. The
    files must hold the same examples (same labels in the same order). Every layer is held in memory
    once (reduced to n columns when wider than n)."""
    from .io import open_activations

    check_choice(scope, "scope", ("all", "layers", "files"))
    files = [str(f) for f in ([files] if isinstance(files, (str, Path)) else files)]
    if not files:
        raise InputError("no activation files given")
    items: list[tuple[str, str]] = []
    ref_labels = None
    rows_sel: dict[str, np.ndarray] = {}
    for path in files:
        with open_activations(path) as f:
            names = list(f.layers) if layers is None else list(layers)
            missing = [x for x in names if x not in f.layers]
            if missing:
                raise InputError(f"{path}: no layer {', '.join(map(repr, missing))}; layers: {', '.join(f.layers)}")
            if subset is None:
                sel, lab = np.arange(f.n, dtype=np.int64), f.labels
            else:
                subs = f.subsets()
                if subset not in subs:
                    raise InputError(f"{path}: subset {subset!r} not present; subsets: {', '.join(subs)}")
                sel, lab = subs[subset].rows, subs[subset].labels
            if ref_labels is None:
                ref_labels = lab
            elif lab.shape != ref_labels.shape or not np.array_equal(lab, ref_labels):
                raise InputError(f"{path}: holds other examples than {files[0]} ({lab.size} vs {ref_labels.size} "
                                 "rows or different labels); similarity needs the same examples in the same order")
            rows_sel[path] = sel
            items.extend((path, x) for x in names)
    if ref_labels.size < 4:
        raise InputError(f"similarity needs at least 4 examples, the files hold {ref_labels.size}")
    notes: list[str] = []
    prepared: dict[tuple[str, str], PreparedLayer | None] = {}
    for path in files:
        with open_activations(path) as f:
            for p, layer in items:
                if p != path:
                    continue
                X = check_matrix(f.layer(layer)[rows_sel[path]], f"{path}: layer '{layer}'", flatten=True)
                if X.shape[1] > X.shape[0] > max_gram_n:
                    notes.append(f"{path}: layer '{layer}' is wider than n = {X.shape[0]} > max_gram_n: left out "
                                 "(use layer_similarity for a minibatch estimate)")
                    prepared[(p, layer)] = None
                    continue
                prepared[(p, layer)] = prepare_layer(X)
    out: list[dict] = []
    for i, (fa, la) in enumerate(items):
        for fb, lb in items[i + 1:]:
            if scope == "layers" and fa != fb or scope == "files" and (fa == fb or la != lb):
                continue
            a, b = prepared[(fa, la)], prepared[(fb, lb)]
            if a is None or b is None:
                continue
            vals = _pair(a, b)
            for metric, v in zip(("cka", "cka_unbiased", "procrustes_angle"), vals):
                out.append({"file_a": fa, "layer_a": la, "file_b": fb, "layer_b": lb, "metric": metric,
                            "value": v})
    for (p, layer), a in prepared.items():
        if a is not None and a.trace == 0:
            notes.append(f"{p}: layer '{layer}' is constant over the examples: its CKA and angles are NaN")
    return out, notes


def similarity_csv(rows: list[dict]) -> str:
    """similarity.csv text: header SIMILARITY_FIELDS, one row per (pair, metric); NaN written as 'nan'."""
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=SIMILARITY_FIELDS, lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({k: (repr(float(r[k])) if k == "value" else r[k]) for k in SIMILARITY_FIELDS})
    return buf.getvalue()


def write_similarity_csv(path, rows: list[dict], *, force: bool = True) -> Path:
    """Write rows to ``path`` (normally OUTDIR/similarity.csv) atomically."""
    from .io import atomic_write_text

    return atomic_write_text(path, similarity_csv(rows), force=force)
