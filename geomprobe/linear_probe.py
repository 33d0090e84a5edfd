"""Linear-probe accuracy of a layer by closed-form ridge regression on one-hot targets.

A seeded, stratified split puts ``test_fraction`` of each class's rows in a held-out part (a class with
one row stays in the training part). On the training part, with features centred by their training
mean and one-hot targets Y centred likewise (an unpenalised intercept),

    W = (Xc^T Xc + lambda I)^{-1} Xc^T Yc,    lambda = alpha * tr(Xc^T Xc) / d,

(the primal form, d x d, when d <= n_train; otherwise the identical dual form
W = Xc^T (Xc Xc^T + lambda I)^{-1} Yc) and a held-out row is predicted as argmax_c of
(x - mean) W + mean(Y). Because lambda scales with the features, accuracy is invariant to a common
scale, to orthogonal maps and to translations of the features. Several label vectors share one split
and one factorisation (``linear_probe(..., extra_labels=...)``): the true labels and the training
(noisy) labels of a label-noise run are probed on the same rows.

``averaging_probe_acc`` is the cheap variant: geomprobe.probes.averaging_classifier (cosine) on the
same split.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np
import scipy.linalg

from . import _moments
from ._validation import (AnalysisError, InputError, check_labels, check_matrix, check_nonneg_float, check_seed)
from .registry import MetricInfo, register

__all__ = ["ProbeResult", "linear_probe", "probe_split", "linear_probe_rows", "METRICS"]

METRICS = register({
    "linear_probe_acc": MetricInfo("held-out accuracy of a ridge linear probe for the subset's labels",
                                   better="neither", random=True),
    "linear_probe_acc_train_labels": MetricInfo(
        "held-out accuracy of a ridge linear probe for the training (noisy) labels", better="neither", random=True),
    "linear_probe_fit_acc": MetricInfo("accuracy of the ridge probe on its own training part", better="neither",
                                       random=True),
    "averaging_probe_acc": MetricInfo("held-out accuracy of the averaging (cosine) classifier, same split",
                                      better="neither", random=True),
})


@dataclass(frozen=True)
class ProbeResult:
    """Held-out and fit accuracy per label vector (key 'labels' and the names of extra_labels)."""

    accuracy: dict[str, float]
    fit_accuracy: dict[str, float]
    n_train: int
    n_test: int
    ridge: float
    form: str  # "primal" (d x d) or "dual" (n_train x n_train)
    train_rows: np.ndarray = field(repr=False)
    test_rows: np.ndarray = field(repr=False)
    notes: tuple[str, ...] = ()


def probe_split(labels: np.ndarray, rng: np.random.Generator, test_fraction: float) -> tuple[np.ndarray, np.ndarray]:
    """Stratified seeded split: floor(test_fraction * n_c) rows of each class held out (sorted indices)."""
    train, test = [], []
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        idx = idx[rng.permutation(idx.size)]
        k = int(np.floor(test_fraction * idx.size)) if idx.size > 1 else 0
        test.append(idx[:k])
        train.append(idx[k:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(test))


def _solve(X: np.ndarray, tr: np.ndarray, targets: list[np.ndarray], alpha: float):
    """Ridge fits on X[tr] sharing one factorisation. Returns (predict(block) -> list of score blocks,
    lambda, form); None for predict when lambda = 0 (every training row the same)."""
    n, d = tr.size, X.shape[1]
    mu = _moments.column_mean(X, rows=tr)
    Ys = [T - T.mean(axis=0) for T in targets]
    Ybar = [T.mean(axis=0) for T in targets]
    if d <= n:
        S = _moments.centered_scatter(X, mu, rows=tr)
        lam = alpha * float(np.trace(S)) / d
        A = S + lam * np.eye(d)
        # Xc^T Yc = X^T Yc (the columns of Yc sum to 0): products in X's dtype, no centred copy
        XtY = [_moments.weighted_sums(X, Y, rows=tr).T for Y in Ys]
        form = "primal"
    else:
        Xc = X[tr].astype(np.float64) - mu
        G = Xc @ Xc.T
        lam = alpha * float(np.trace(G)) / d
        A = G + lam * np.eye(n)
        form = "dual"
    if lam <= 0:
        return None, lam, form
    try:
        cf = scipy.linalg.cho_factor(A, lower=True, check_finite=False)
    except np.linalg.LinAlgError as exc:
        raise AnalysisError(f"linear probe: Cholesky factorisation of the {A.shape[0]} x {A.shape[0]} ridge "
                            f"system failed (lambda = {lam:.3g}): {exc}") from None
    if form == "primal":
        Ws = [scipy.linalg.cho_solve(cf, B, check_finite=False) for B in XtY]
    else:
        Ws = [Xc.T @ scipy.linalg.cho_solve(cf, Y, check_finite=False) for Y in Ys]
    # score = (x - mu) W + ybar = x W + (ybar - mu W): the block is multiplied in its own dtype
    Wx = [W.astype(X.dtype) for W in Ws]
    offs = [yb - mu @ W for W, yb in zip(Ws, Ybar)]

    def predict(block: np.ndarray) -> list[np.ndarray]:
        return [(block @ W).astype(np.float64) + o for W, o in zip(Wx, offs)]

    return predict, lam, form


def linear_probe(X, labels, *, seed=0, test_fraction: float = 0.5, alpha: float = 1e-3,
                 extra_labels: Mapping[str, object] | None = None, averaging: bool = False) -> ProbeResult:
    """Held-out accuracy of a ridge probe of X's rows for ``labels`` (and each of ``extra_labels`` on the
    same split, stratified by ``labels``). ``seed``: int or Generator. ``averaging``: also the averaging
    classifier's accuracy, stored under key 'averaging'."""
    X = check_matrix(X, "X", flatten=True)
    y = check_labels(labels, X.shape[0])
    tf = check_nonneg_float(test_fraction, "test_fraction")
    if not 0 < tf < 1:
        raise InputError(f"test_fraction must be in (0, 1), got {test_fraction!r}")
    alpha = check_nonneg_float(alpha, "alpha")
    if alpha == 0:
        raise InputError("alpha must be > 0 (ridge), got 0")
    sets = {"labels": y}
    for k, v in (extra_labels or {}).items():
        sets[k] = check_labels(v, X.shape[0], k)
    rng = check_seed(seed)
    tr, te = probe_split(y, rng, tf)
    if te.size == 0:
        raise InputError(f"linear probe: no held-out rows (n = {X.shape[0]}, test_fraction = {tf}); "
                         "every class needs >= 2 rows")
    notes: list[str] = []
    classes = {k: np.unique(v[tr]) for k, v in sets.items()}
    targets = []
    for k, v in sets.items():
        T = (v[tr][:, None] == classes[k][None, :]).astype(np.float64)
        targets.append(T)
        unseen = int(np.sum(~np.isin(v[te], classes[k])))
        if unseen:
            notes.append(f"{k}: {unseen} held-out row(s) have a class absent from the training part (counted wrong)")
    predict, lam, form = _solve(X, tr, targets, alpha)
    acc, fit = {}, {}
    if predict is None:
        notes.append("every training row is the same vector: the probe predicts the majority class")
        for k, v in sets.items():
            maj = classes[k][np.argmax([np.sum(v[tr] == c) for c in classes[k]])]
            acc[k], fit[k] = float(np.mean(v[te] == maj)), float(np.mean(v[tr] == maj))
    else:
        for name, rows in (("test", te), ("train", tr)):
            hits = np.zeros(len(sets))
            for a in range(0, rows.size, _moments.CHUNK_ROWS):
                r = rows[a:a + _moments.CHUNK_ROWS]
                for j, (k, P) in enumerate(zip(sets, predict(X[r]))):
                    hits[j] += np.sum(classes[k][np.argmax(P, axis=1)] == sets[k][r])
            (acc if name == "test" else fit).update({k: float(h / rows.size) for k, h in zip(sets, hits)})
    if averaging:
        from .probes import averaging_classifier

        res = averaging_classifier(X[tr], y[tr], X[te], y[te], kind="cosine")
        acc["averaging"] = 1.0 - float(res.error)
    return ProbeResult(acc, fit, int(tr.size), int(te.size), float(lam), form, tr, te, tuple(notes))


def linear_probe_rows(X, labels, rng: np.random.Generator, *, train_labels=None, test_fraction: float = 0.5,
                      alpha: float = 1e-3) -> tuple[list[tuple[str, object, float]], list[str]]:
    """Rows (metric, None, value): linear_probe_acc, linear_probe_fit_acc, averaging_probe_acc and, with
    ``train_labels``, linear_probe_acc_train_labels (same split)."""
    extra = {"train_labels": train_labels} if train_labels is not None else None
    r = linear_probe(X, labels, seed=rng, test_fraction=test_fraction, alpha=alpha, extra_labels=extra,
                     averaging=True)
    rows = [("linear_probe_acc", None, r.accuracy["labels"]), ("linear_probe_fit_acc", None, r.fit_accuracy["labels"]),
            ("averaging_probe_acc", None, r.accuracy["averaging"])]
    if extra:
        rows.append(("linear_probe_acc_train_labels", None, r.accuracy["train_labels"]))
    return rows, [f"linear probe: {m}" for m in r.notes]
