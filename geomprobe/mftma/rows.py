"""Long-format metric rows for the command line (``geomprobe analyze``)."""
from __future__ import annotations

import numpy as np

from .._validation import InputError, check_labels, check_matrix, check_positive_int, encode_labels
from .capacity import manifold_analysis
from .simcap import empirical_capacity


def mftma_rows(
    X,
    labels,
    rng: np.random.Generator,
    *,
    kappa: float = 0.0,
    n_t: int = 200,
    n_reps: int = 10,
    per_class: int | None = 50,
    max_classes: int | None = None,
    empirical: bool = False,
    solver: str = "fast",
    seed_mode: str = "spawn",
) -> tuple[list[tuple[str, object, float]], list[str]]:
    """MFTMA metrics as rows (metric, class_id or None, value) plus human-readable notes.

    Rows: capacity, radius, dimension, center_correlation, K (class None); capacity, radius,
    dimension per class (class = class id); empirical_capacity and empirical_Nc if ``empirical``.
    ``max_classes``: seeded choice of that many classes (None = all). ``per_class``: seeded
    subsample of that many examples per class (None = all; smaller classes are kept whole).
    Classes of size 1 are kept (point manifolds are valid: capacity ~ 2, radius = dimension = 0);
    fewer than 2 classes is an InputError. All randomness comes from ``rng``. ``seed_mode`` is passed
    to :func:`manifold_analysis` ("reference": its seed is the drawn seed modulo 2**32).
    """
    X, classes, chosen, rows_idx, notes = sample_manifolds(X, labels, rng, per_class=per_class,
                                                           max_classes=max_classes, what="MFTMA")
    n_single = sum(idx.size == 1 for idx in rows_idx)
    if n_single:
        notes.append(f"MFTMA: {n_single} class(es) with a single example analysed as point manifolds")
    Xs = [X[idx] for idx in rows_idx]
    ids = classes[chosen]
    seed_ma, seed_emp = rng.integers(0, 2**63 - 1, size=2)
    seed_ma = int(seed_ma) % 2**32 if seed_mode == "reference" else int(seed_ma)
    res = manifold_analysis(Xs, kappa=kappa, n_t=n_t, n_reps=n_reps, seed=seed_ma, solver=solver,
                            seed_mode=seed_mode)
    notes.extend(f"MFTMA: {n}" for n in res.notes)
    rows: list[tuple[str, object, float]] = [
        ("capacity", None, res.capacity),
        ("radius", None, res.radius),
        ("dimension", None, res.dimension),
        ("center_correlation", None, res.center_correlation),
        ("K", None, float(res.K)),
    ]
    for i, cid in enumerate(ids):
        cid = cid.item() if hasattr(cid, "item") else cid
        rows.append(("capacity", cid, float(res.class_capacity[i])))
        rows.append(("radius", cid, float(res.class_radius[i])))
        rows.append(("dimension", cid, float(res.class_dimension[i])))
    if empirical:
        emp = empirical_capacity(Xs, seed=int(seed_emp))
        rows.append(("empirical_capacity", None, emp.capacity))
        rows.append(("empirical_Nc", None, emp.N_c))
        notes.extend(f"MFTMA empirical capacity: {n}" for n in emp.notes)
    return rows, notes


def sample_manifolds(X, labels, rng: np.random.Generator, *, per_class: int | None, max_classes: int | None,
                     what: str):
    """Validate ``X`` / ``labels`` and draw the manifolds a rows function analyses: a seeded choice of
    ``max_classes`` classes (None = all), then a seeded subsample of ``per_class`` rows per chosen class
    (None = all; smaller classes kept whole), in that order from ``rng``. Returns (X, classes, chosen
    class codes, row indices per chosen class, notes prefixed with ``what``). Fewer than 2 classes is
    an InputError. Shared by mftma_rows and glue_rows, so both draw the same manifolds from the same rng."""
    X = check_matrix(X, "X")
    labels = check_labels(labels, X.shape[0])
    if per_class is not None:
        per_class = check_positive_int(per_class, "per_class")
    if max_classes is not None:
        max_classes = check_positive_int(max_classes, "max_classes", minimum=2)
    classes, codes = encode_labels(labels)
    if len(classes) < 2:
        raise InputError(f"{what} needs at least 2 classes, labels contain {len(classes)}")
    notes: list[str] = []
    chosen = np.arange(len(classes))
    if max_classes is not None and max_classes < len(classes):
        chosen = np.sort(rng.choice(len(classes), size=max_classes, replace=False))
        notes.append(f"{what}: {max_classes} of {len(classes)} classes chosen at random (max_classes)")
    rows_idx = []
    n_sub = 0
    for c in chosen:
        idx = np.flatnonzero(codes == c)
        if per_class is not None and idx.size > per_class:
            idx = np.sort(rng.choice(idx, size=per_class, replace=False))
            n_sub += 1
        rows_idx.append(idx)
    if n_sub:
        notes.append(f"{what}: {n_sub} class(es) subsampled to {per_class} examples (per_class)")
    return X, classes, chosen, rows_idx, notes
