"""The per-layer companion measures of one (layer, subset) task as rows for ``geomprobe analyze``.

Each measure lives in its own module (spectral, collapse, linear_probe) with its function, result type,
rows function and registry entries; this module only runs them in a fixed order with one generator.
"""
from __future__ import annotations

import numpy as np

from ._validation import check_labels, check_matrix, encode_labels

__all__ = ["companion_rows"]


def companion_rows(
    X,
    labels,
    rng: np.random.Generator,
    *,
    train_labels=None,
    weights=None,
    logits=None,
    spectral: bool = True,
    collapse: bool = True,
    probe: bool = True,
    test_fraction: float = 0.5,
    alpha: float = 1e-3,
) -> tuple[list[tuple[str, object, float]], list[str]]:
    """Rows (metric, class_id or None, value) plus notes, shaped like ``mftma_rows``.

    participation_ratio, effective_rank; nc1, nc2_equinorm, nc2_equiangular, nc2_maxangle (and nc3 /
    nc4 with the last layer's ``weights`` (C x d) / the network's ``logits`` (n x C)); linear_probe_acc,
    linear_probe_fit_acc, averaging_probe_acc (and linear_probe_acc_train_labels with ``train_labels``).
    Neural collapse and the probes need >= 2 classes (otherwise skipped with a note); the probe's split
    comes from ``rng``.
    """
    X = check_matrix(X, "X", flatten=True)
    labels = check_labels(labels, X.shape[0])
    if train_labels is not None:
        train_labels = check_labels(train_labels, X.shape[0], "train_labels")
    rows: list[tuple[str, object, float]] = []
    notes: list[str] = []
    n_classes = encode_labels(labels)[0].size
    if spectral:
        from .spectral import spectral_rows

        r, n = spectral_rows(X)
        rows += r
        notes += n
    if collapse:
        if n_classes < 2:
            notes.append(f"neural collapse skipped: {n_classes} class(es), needs >= 2")
        else:
            from .collapse import collapse_rows

            r, n = collapse_rows(X, labels, weights=weights, logits=logits)
            rows += r
            notes += n
    if probe:
        counts = np.bincount(encode_labels(labels)[1])
        if n_classes < 2 or counts.max() < 2:
            notes.append(f"linear probe skipped: {n_classes} class(es) with at most {counts.max()} row(s) each; "
                         "needs >= 2 classes and a class with >= 2 rows")
        else:
            from .linear_probe import linear_probe_rows

            r, n = linear_probe_rows(X, labels, rng, train_labels=train_labels, test_fraction=test_fraction,
                                     alpha=alpha)
            rows += r
            notes += n
    return rows, notes
