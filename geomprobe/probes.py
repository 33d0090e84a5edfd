"""Identity-crisis probes, layer-wise collapse, weight distance and normalised loss (papers 002, 004).

Everything here works on saved numpy arrays; nothing imports torch. See docs/metrics.md (section
"Identity-crisis probes ...") for formulas, invariances and the choices made.

"Correlation" between two vectors means, throughout, the cosine similarity of the flattened vectors
<a, b> / (||a|| ||b||). Paper 002 does not define its "correlation" further, but its probe inputs are
built by rotating a random vector "to a given correlation rho" with the training image, rho = 0 being
"orthogonal" to it and rho = 1 being the image itself: that is the cosine (uncentred) correlation. The
functions that measure correlations also accept ``kind="pearson"`` (each vector centred by its own mean
over its elements first) for users who want the mean-centred version.
"""
from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ._kernels import probes as _k
from ._validation import (
    AnalysisError,
    InputError,
    check_choice,
    check_finite,
    check_labels,
    check_matrix,
    check_positive_int,
    check_seed,
    describe_shape,
)

__all__ = [
    "ProbeInputs",
    "ProbeCorrelations",
    "ProbeHeatmap",
    "AveragingClassifierResult",
    "LayerCollapse",
    "WeightDistance",
    "NormalizedLoss",
    "LossFit",
    "make_probe_inputs",
    "probe_correlations",
    "probe_heatmap",
    "averaging_classifier",
    "layerwise_collapse",
    "weight_distance",
    "frobenius_norm_product",
    "normalized_loss",
    "normalized_loss_fit",
    "one_layer_linear_solution",
    "one_layer_linear_prediction",
    "probe_rows",
]

_KINDS = ("cosine", "pearson")


# ------------------------------------------------------------------------------------------------
# helpers
# ------------------------------------------------------------------------------------------------
def _check_vector(x: Any, name: str, *, min_size: int = 1) -> np.ndarray:
    """Any-shape finite real array -> float64 copy (shape kept)."""
    arr = np.asarray(x)
    if arr.dtype.hasobject or not (np.issubdtype(arr.dtype, np.number) or arr.dtype == np.bool_):
        raise InputError(f"{name} must be a numeric array, got dtype {arr.dtype}")
    if np.iscomplexobj(arr):
        raise InputError(f"{name} must be real, got dtype {arr.dtype}")
    if arr.size < min_size:
        raise InputError(
            f"{name} must have at least {min_size} element(s), got shape {describe_shape(arr.shape)}"
        )
    arr = np.array(arr, dtype=np.float64, copy=True)
    check_finite(arr.reshape(1, -1), name)
    return arr


def _check_1d(x: Any, name: str, *, n: int | None = None, n_name: str = "") -> np.ndarray:
    arr = np.asarray(x)
    if arr.ndim == 0:
        arr = arr.reshape(1)
    if arr.ndim != 1:
        raise InputError(f"{name} must be 1-D, got shape {describe_shape(arr.shape)}")
    if arr.dtype.hasobject or not (np.issubdtype(arr.dtype, np.number) or arr.dtype == np.bool_):
        raise InputError(f"{name} must be numeric, got dtype {arr.dtype}")
    if np.iscomplexobj(arr):
        raise InputError(f"{name} must be real, got dtype {arr.dtype}")
    if n is not None and arr.shape[0] != n:
        raise InputError(f"{name} has {arr.shape[0]} entries but {n_name} has {n}")
    arr = arr.astype(np.float64)
    if arr.size and not np.all(np.isfinite(arr)):
        i = int(np.flatnonzero(~np.isfinite(arr))[0])
        raise InputError(f"{name} must be finite, got {arr[i]} at index {i}")
    return arr


def _check_rho(rho: Any, name: str = "rho", *, n: int | None = None, n_name: str = "") -> np.ndarray:
    r = _check_1d(rho, name, n=n, n_name=n_name)
    if r.size == 0:
        raise InputError(f"{name} must hold at least one value in [0, 1], got an empty array")
    bad = (r < 0.0) | (r > 1.0)
    if np.any(bad):
        i = int(np.flatnonzero(bad)[0])
        raise InputError(f"{name} must lie in [0, 1], got {float(r[i])!r} at index {i}")
    return r


# ------------------------------------------------------------------------------------------------
# probe inputs at a given correlation with the training example
# ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ProbeInputs:
    """Probe inputs x_i = ||x^|| (rho_i e + sqrt(1 - rho_i^2) u_i), e = x^ / ||x^||, u_i unit and _|_ e.

    ``inputs`` and ``directions`` have shape (n, *x_hat.shape) (float64); ``rho`` is the requested
    correlation per row (the grid repeated ``n_per_rho`` times, grid order kept); ``achieved`` the
    measured cosine between each input and x^, ``max_abs_error`` = max |achieved - rho|.
    """

    x_hat: np.ndarray
    inputs: np.ndarray
    rho: np.ndarray
    directions: np.ndarray
    achieved: np.ndarray
    max_abs_error: float
    max_rel_norm_error: float


def make_probe_inputs(
    x_hat: Any,
    rho: Any,
    n_per_rho: int = 1,
    *,
    seed: Any = None,
    distribution: str = "normal",
) -> ProbeInputs:
    """Inputs whose cosine with ``x_hat`` is exactly ``rho`` and whose norm equals ||x_hat|| (paper 002).

    A random vector g (standard normal, or uniform on [0, 1) like random pixels when
    ``distribution="uniform"``) is orthogonalised against x^ (Gram-Schmidt applied twice for float64
    accuracy), normalised to u, and mixed as ||x^|| (rho x^/||x^|| + sqrt(1 - rho^2) u). x_hat may have
    any shape (flattened internally); outputs have x_hat's shape per row and are float64 (casting to
    float32 changes the correlation at the 1e-7 level).
    """
    x = _check_vector(x_hat, "x_hat", min_size=2)
    r = _check_rho(rho)
    count = check_positive_int(n_per_rho, "n_per_rho")
    check_choice(distribution, "distribution", ("normal", "uniform"))
    rng = check_seed(seed)
    flat = x.reshape(-1)
    norm = float(np.linalg.norm(flat))
    if norm == 0.0:
        raise InputError(f"x_hat must have a non-zero norm (the probes are rotated towards it), got norm 0 "
                         f"for shape {describe_shape(x.shape)}")
    e = flat / norm
    d = flat.size
    rho_rows = np.repeat(r, count)
    n = rho_rows.size

    def draw(k: int) -> np.ndarray:
        return rng.standard_normal((k, d)) if distribution == "normal" else rng.random((k, d))

    u = draw(n)
    todo = np.arange(n)
    for _attempt in range(100):
        block = u[todo]
        block -= np.outer(block @ e, e)
        block -= np.outer(block @ e, e)  # second pass: residual component along e ~ 1e-17
        norms = np.linalg.norm(block, axis=1)
        ok = norms > 1e-8 * max(1.0, math.sqrt(d))
        block[ok] /= norms[ok, None]
        u[todo] = block
        todo = todo[~ok]
        if todo.size == 0:
            break
        u[todo] = draw(todo.size)
    else:  # pragma: no cover - probability ~0 for d >= 2
        raise AnalysisError(f"could not draw a direction orthogonal to x_hat in 100 attempts ({todo.size} left)")
    inputs = norm * (rho_rows[:, None] * e[None, :] + np.sqrt(1.0 - rho_rows * rho_rows)[:, None] * u)
    in_norms = np.linalg.norm(inputs, axis=1)
    achieved = (inputs @ flat) / (in_norms * norm)
    rel_norm = np.abs(in_norms - norm) / norm
    shape = (n,) + x.shape
    return ProbeInputs(
        x_hat=x,
        inputs=inputs.reshape(shape),
        rho=rho_rows,
        directions=u.reshape(shape),
        achieved=achieved,
        max_abs_error=float(np.max(np.abs(achieved - rho_rows))),
        max_rel_norm_error=float(np.max(rel_norm)),
    )


# ------------------------------------------------------------------------------------------------
# correlation of predictions with the identity target (the input) and the constant target (x^)
# ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ProbeCorrelations:
    """Per-probe and per-rho correlations of predictions with the identity and constant targets.

    ``identity[i]`` = corr(prediction_i, input_i), ``constant[i]`` = corr(prediction_i, x^); NaN where a
    prediction has zero norm (undefined; counted in ``n_undefined`` and left out of the aggregates).
    ``rho`` is the sorted unique grid; ``*_mean`` / ``*_std`` (population std, ddof=0) are over the
    defined probes of each rho; ``count`` probes per rho, ``n_undefined`` undefined ones.
    """

    rho: np.ndarray
    identity_mean: np.ndarray
    identity_std: np.ndarray
    constant_mean: np.ndarray
    constant_std: np.ndarray
    count: np.ndarray
    n_undefined: np.ndarray
    identity: np.ndarray
    constant: np.ndarray
    probe_rho: np.ndarray
    kind: str
    notes: tuple[str, ...]


def probe_correlations(
    inputs: Any, predictions: Any, x_hat: Any, rho: Any, *, kind: str = "cosine"
) -> ProbeCorrelations:
    """Correlation of each prediction with its input (identity) and with x^ (constant), per rho.

    inputs (n, ...) and predictions (n, ...) must have the same number of elements per row as x_hat
    (the model maps an input to an output of the same size); rho (n,) is each probe's correlation
    with x^ (e.g. ``ProbeInputs.rho``).
    """
    check_choice(kind, "kind", _KINDS)
    X = check_matrix(inputs, "inputs", flatten=True)
    P = check_matrix(predictions, "predictions", flatten=True)
    xh = _check_vector(x_hat, "x_hat").reshape(-1)
    n, d = X.shape
    if P.shape[0] != n:
        raise InputError(f"predictions has {P.shape[0]} rows but inputs has {n} rows")
    if P.shape[1] != d:
        raise InputError(
            f"predictions must have as many elements per row as inputs (identity target), got {P.shape[1]} "
            f"and {d}"
        )
    if xh.size != d:
        raise InputError(f"x_hat has {xh.size} elements but inputs has {d} elements per row")
    if not np.any(xh):
        raise InputError("x_hat must have a non-zero norm (the constant target), got norm 0")
    r = _check_rho(rho, "rho", n=n, n_name="inputs (rows)")
    centre = kind == "pearson"
    ident, und_i = _k.rowwise_correlation(P, X, centre)
    const, und_c = _k.rowwise_correlation(P, np.broadcast_to(xh, (n, d)).copy(), centre)
    undefined = und_i | und_c
    ident[undefined] = np.nan
    const[undefined] = np.nan
    grid, inv = np.unique(r, return_inverse=True)
    inv = inv.reshape(-1)
    g = grid.size
    out = {k: np.full(g, np.nan) for k in ("im", "is", "cm", "cs")}
    count = np.bincount(inv, minlength=g).astype(np.int64)
    n_und = np.bincount(inv, weights=undefined.astype(np.float64), minlength=g).astype(np.int64)
    notes: list[str] = []
    for j in range(g):
        sel = (inv == j) & ~undefined
        if not np.any(sel):
            notes.append(f"rho={grid[j]:g}: all {count[j]} prediction(s) have zero norm; correlations undefined (NaN)")
            continue
        out["im"][j] = ident[sel].mean()
        out["is"][j] = ident[sel].std()
        out["cm"][j] = const[sel].mean()
        out["cs"][j] = const[sel].std()
    if undefined.any():
        notes.insert(0, f"{int(undefined.sum())} of {n} prediction(s) have zero norm (correlation undefined); "
                        "left out of the means")
    return ProbeCorrelations(
        rho=grid, identity_mean=out["im"], identity_std=out["is"], constant_mean=out["cm"],
        constant_std=out["cs"], count=count, n_undefined=n_und, identity=ident, constant=const,
        probe_rho=r, kind=kind, notes=tuple(notes),
    )


@dataclass(frozen=True)
class ProbeHeatmap:
    """Rows = models (e.g. depths) in the given order, columns = the common rho grid."""

    models: tuple[str, ...]
    rho: np.ndarray
    identity: np.ndarray
    constant: np.ndarray
    identity_std: np.ndarray
    constant_std: np.ndarray


def probe_heatmap(results: Mapping[str, ProbeCorrelations] | Sequence[tuple[str, ProbeCorrelations]]) -> ProbeHeatmap:
    """Stack several models' ProbeCorrelations into (n_models, n_rho) matrices for a depth x rho heatmap."""
    items = list(results.items()) if isinstance(results, Mapping) else list(results)
    if not items:
        raise InputError("results must hold at least one (model, ProbeCorrelations) pair, got none")
    for name, res in items:
        if not isinstance(res, ProbeCorrelations):
            raise InputError(f"results[{name!r}] must be a ProbeCorrelations, got {type(res).__name__}")
    grid = items[0][1].rho
    for name, res in items[1:]:
        if res.rho.shape != grid.shape or not np.array_equal(res.rho, grid):
            raise InputError(
                f"results[{name!r}] has rho grid {np.round(res.rho, 6).tolist()} but results[{items[0][0]!r}] "
                f"has {np.round(grid, 6).tolist()}: all models must share one grid"
            )
    return ProbeHeatmap(
        models=tuple(str(k) for k, _ in items),
        rho=grid.copy(),
        identity=np.stack([res.identity_mean for _, res in items]),
        constant=np.stack([res.constant_mean for _, res in items]),
        identity_std=np.stack([res.identity_std for _, res in items]),
        constant_std=np.stack([res.constant_std for _, res in items]),
    )


# ------------------------------------------------------------------------------------------------
# correlation-weighted averaging classifier (paper 002, section 3.4)
# ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class AveragingClassifierResult:
    """error = fraction of test rows whose prediction differs from their label.

    ``scores`` (n_test, n_classes) = (1/n_train) sum_i corr(test, train_i) onehot(y_i), columns in
    ``classes`` order; ``predictions`` are class labels (first argmax: ties go to the smallest class).
    """

    error: float
    predictions: np.ndarray
    scores: np.ndarray
    classes: np.ndarray
    n_train: int
    n_test: int
    n_zero_train: int
    n_zero_test: int
    n_unseen_test: int
    chance_error: float
    kind: str
    notes: tuple[str, ...]


def averaging_classifier(
    train: Any, train_labels: Any, test: Any, test_labels: Any, *, kind: str = "cosine"
) -> AveragingClassifierResult:
    """Paper 002 section 3.4: predict argmax_c of the mean one-hot training label weighted by corr(test, train_i).

    Because the correlation is linear in the normalised test vector, sum_i corr(t, x_i) onehot(y_i)_c =
    <t/||t||, S_c> with S_c = sum_{y_i = c} x_i/||x_i||; the kernel streams over rows, so memory is
    O(n_classes * features), never n_test * n_train, and time O((n_train + n_test) * features * K).
    Rows of zero norm have correlation 0 with everything (counted and reported).
    """
    check_choice(kind, "kind", _KINDS)
    Xtr = check_matrix(train, "train", flatten=True)
    Xte = check_matrix(test, "test", flatten=True)
    if Xtr.shape[1] != Xte.shape[1]:
        raise InputError(f"test has {Xte.shape[1]} features but train has {Xtr.shape[1]}")
    ytr = check_labels(train_labels, Xtr.shape[0], "train_labels", rows_name="train")
    yte = check_labels(test_labels, Xte.shape[0], "test_labels", rows_name="test")
    classes, codes = np.unique(ytr, return_inverse=True)
    codes = codes.reshape(-1).astype(np.int64)
    centre = kind == "pearson"
    S, zero_tr = _k.class_direction_sums(Xtr, codes, classes.size, centre)
    scores, pred_codes, zero_te = _k.averaging_scores(Xte, S, centre)
    scores /= Xtr.shape[0]
    pred = classes[pred_codes]
    unseen = int(np.sum(~np.isin(yte, classes)))
    notes = []
    if zero_tr.any():
        notes.append(f"{int(zero_tr.sum())} of {Xtr.shape[0]} train row(s) have zero norm: correlation 0, no vote")
    if zero_te.any():
        notes.append(f"{int(zero_te.sum())} of {Xte.shape[0]} test row(s) have zero norm: all scores 0, "
                     f"predicted the smallest class {classes[0]}")
    if unseen:
        notes.append(f"{unseen} test row(s) have a label absent from train: always counted as errors")
    return AveragingClassifierResult(
        error=float(np.mean(pred != yte)), predictions=pred, scores=scores, classes=classes,
        n_train=Xtr.shape[0], n_test=Xte.shape[0], n_zero_train=int(zero_tr.sum()),
        n_zero_test=int(zero_te.sum()), n_unseen_test=unseen, chance_error=1.0 - 1.0 / classes.size,
        kind=kind, notes=tuple(notes),
    )


@dataclass(frozen=True)
class LayerCollapse:
    """Averaging-classifier test error per layer (``error``, layer order kept) and on the raw inputs."""

    layers: tuple[str, ...]
    error: np.ndarray
    baseline_error: float | None
    chance_error: float
    results: Mapping[str, AveragingClassifierResult]
    notes: tuple[str, ...]


def _split_mask(split: Any, n: int) -> np.ndarray:
    s = np.asarray(split)
    if s.ndim != 1 or s.shape[0] != n:
        raise InputError(f"split must be 1-D with {n} entries (one per labelled row), got shape {describe_shape(s.shape)}")
    if s.dtype == np.bool_:
        return ~s  # True = test given as a boolean mask -> train mask is its complement
    s = s.astype(str)
    bad = ~np.isin(s, ("train", "test"))
    if np.any(bad):
        i = int(np.flatnonzero(bad)[0])
        raise InputError(f"split must hold 'train' or 'test', got {str(s[i])!r} at index {i}")
    return s == "train"


def layerwise_collapse(
    representations: Mapping[str, Any],
    labels: Any,
    split: Any,
    *,
    inputs: Any = None,
    kind: str = "cosine",
) -> LayerCollapse:
    """Layer-wise collapse (paper 002 section 3.4): averaging-classifier test error at each layer.

    ``representations`` maps layer -> (n, ...) array over the same n labelled rows (layer order kept);
    ``split`` marks each row 'train' or 'test' (or a bool array, True = test); ``inputs`` (n, ...) are
    the raw inputs of those rows, giving the baseline error. A layer that computes the identity keeps
    the baseline error; a collapsed layer approaches ``chance_error`` = 1 - 1/n_classes.
    """
    if not isinstance(representations, Mapping) or not representations:
        raise InputError("representations must be a non-empty mapping layer -> (n, ...) array")
    y = check_labels(labels)
    is_train = _split_mask(split, y.shape[0])
    if not is_train.any() or is_train.all():
        raise InputError(
            f"split must mark at least one 'train' and one 'test' row, got {int(is_train.sum())} train and "
            f"{int((~is_train).sum())} test"
        )

    def run(arr: Any, name: str) -> AveragingClassifierResult:
        A = check_matrix(arr, name, flatten=True)
        if A.shape[0] != y.shape[0]:
            raise InputError(f"{name} has {A.shape[0]} rows but labels has {y.shape[0]} entries")
        return averaging_classifier(A[is_train], y[is_train], A[~is_train], y[~is_train], kind=kind)

    results = {str(layer): run(arr, f"representations[{layer!r}]") for layer, arr in representations.items()}
    base = run(inputs, "inputs") if inputs is not None else None
    notes = [f"{layer}: {note}" for layer, res in results.items() for note in res.notes]
    if base is not None:
        notes += [f"inputs: {note}" for note in base.notes]
    first = next(iter(results.values()))
    return LayerCollapse(
        layers=tuple(results), error=np.array([res.error for res in results.values()]),
        baseline_error=None if base is None else base.error, chance_error=first.chance_error,
        results=results, notes=tuple(notes),
    )


# ------------------------------------------------------------------------------------------------
# relative weight distance from initialisation (paper 002, appendix D)
# ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class WeightDistance:
    """distance[k] = ||W_t - W_0||_F / ||W_0||_F for tensor names[k] (Frobenius = l2 of the flattened tensor)."""

    names: tuple[str, ...]
    distance: np.ndarray
    init_norm: np.ndarray
    skipped: tuple[tuple[str, str], ...]


def _load_weights(obj: Any, name: str) -> dict[str, np.ndarray]:
    if isinstance(obj, (str, os.PathLike)):
        path = Path(obj)
        if not path.is_file():
            raise InputError(f"{name}: file {str(path)!r} does not exist")
        try:
            npz = np.load(path, allow_pickle=False)
            if not hasattr(npz, "files"):
                raise InputError(f"{name}: {str(path)!r} is a single .npy array, expected an .npz of named tensors")
            with npz:
                return {k: npz[k] for k in npz.files}
        except InputError:
            raise
        except (ValueError, OSError, EOFError) as exc:
            raise InputError(f"{name}: could not read {str(path)!r} as .npz without pickles ({exc})") from None
    if isinstance(obj, Mapping):
        return {str(k): np.asarray(v) for k, v in obj.items()}
    raise InputError(f"{name} must be a mapping name -> array or a path to an .npz file, got {type(obj).__name__}")


def weight_distance(init: Any, final: Any, *, zero_init: str = "raise") -> WeightDistance:
    """Relative l2 distance of each weight tensor from its initial value (paper 002, appendix D).

    ``init`` / ``final``: mappings name -> array, or paths to .npz files (loaded with allow_pickle=False).
    Both must hold the same names with the same shapes; order follows ``init``. A tensor whose initial
    norm is 0 (e.g. zero-initialised biases) has no relative distance: ``zero_init="raise"`` refuses it,
    ``"skip"`` leaves it out and lists it in ``skipped``.
    """
    check_choice(zero_init, "zero_init", ("raise", "skip"))
    w0 = _load_weights(init, "init")
    wt = _load_weights(final, "final")
    if not w0:
        raise InputError("init holds no tensors")
    missing = [k for k in w0 if k not in wt]
    extra = [k for k in wt if k not in w0]
    if missing or extra:
        parts = []
        if missing:
            parts.append(f"missing from final: {', '.join(missing[:5])}" + (" ..." if len(missing) > 5 else ""))
        if extra:
            parts.append(f"missing from init: {', '.join(extra[:5])}" + (" ..." if len(extra) > 5 else ""))
        raise InputError("init and final must hold the same tensor names; " + "; ".join(parts))
    names, dist, norms, skipped = [], [], [], []
    for k, a in w0.items():
        b = wt[k]
        if a.shape != b.shape:
            raise InputError(
                f"tensor {k!r} has shape {describe_shape(a.shape)} in init but {describe_shape(b.shape)} in final"
            )
        for arr, which in ((a, "init"), (b, "final")):
            if arr.dtype.hasobject or not (np.issubdtype(arr.dtype, np.number) or arr.dtype == np.bool_):
                raise InputError(f"tensor {k!r} in {which} must be numeric, got dtype {arr.dtype}")
            if np.iscomplexobj(arr):
                raise InputError(f"tensor {k!r} in {which} must be real, got dtype {arr.dtype}")
        a64 = a.astype(np.float64).reshape(1, -1)
        b64 = b.astype(np.float64).reshape(1, -1)
        check_finite(a64, f"init tensor {k!r}")
        check_finite(b64, f"final tensor {k!r}")
        n0 = float(np.linalg.norm(a64))
        if n0 == 0.0:
            if zero_init == "raise":
                raise InputError(
                    f"tensor {k!r} has zero norm at init (shape {describe_shape(a.shape)}): the relative distance "
                    "is undefined; pass zero_init='skip' to leave such tensors out"
                )
            skipped.append((k, "zero norm at init"))
            continue
        names.append(k)
        norms.append(n0)
        dist.append(float(np.linalg.norm(b64 - a64)) / n0)
    return WeightDistance(names=tuple(names), distance=np.array(dist), init_norm=np.array(norms),
                          skipped=tuple(skipped))


# ------------------------------------------------------------------------------------------------
# normalised loss (paper 004)
# ------------------------------------------------------------------------------------------------
def _log_norm_product(norms: Sequence[float], name: str) -> float:
    total = 0.0
    for i, v in enumerate(norms):
        if not np.isfinite(v) or v <= 0:
            raise InputError(f"{name}[{i}] must be a finite number > 0, got {v!r}")
        total += math.log(v)
    return total


def _exp_product(log_total: float, norms: list[float], name: str) -> float:
    try:
        prod = math.exp(log_total)
    except OverflowError:
        prod = math.inf
    if not np.isfinite(prod) or prod == 0.0:
        raise InputError(f"the product of {name} over/underflows float64 (norms {norms})")
    return prod


def frobenius_norm_product(weights: Sequence[Any]) -> float:
    """prod_k ||W_k||_F over the given weight tensors (each flattened); computed through logs."""
    ws = list(weights.values()) if isinstance(weights, Mapping) else list(weights)
    if not ws:
        raise InputError("weights must hold at least one tensor, got none")
    norms = []
    for i, w in enumerate(ws):
        arr = _check_vector(w, f"weights[{i}]")
        norms.append(float(np.linalg.norm(arr.reshape(-1))))
    return _exp_product(_log_norm_product(norms, "norm of weights"), norms, "the weight norms")


@dataclass(frozen=True)
class NormalizedLoss:
    """loss = mean cross-entropy of logits / norm_product; unnormalized_loss of the raw logits."""

    loss: float
    unnormalized_loss: float
    norm_product: float
    per_example: np.ndarray


def _cross_entropy(Z: np.ndarray, y: np.ndarray) -> np.ndarray:
    m = Z.max(axis=1, keepdims=True)
    lse = m[:, 0] + np.log(np.exp(Z - m).sum(axis=1))
    return lse - Z[np.arange(Z.shape[0]), y]


def normalized_loss(logits: Any, labels: Any, *, norms: Any = None, weights: Any = None) -> NormalizedLoss:
    """Cross-entropy of f(x) / prod_k ||W_k||_F (paper 004): give the per-layer ``norms`` or the ``weights``.

    logits (n, n_classes) are the unnormalised outputs of a bias-free ReLU network (positively
    homogeneous: dividing the weights of every layer by its norm divides the logits by the product);
    labels (n,) are class indices 0..n_classes-1. Binary logistic loss: pass logits [0, f(x)].
    """
    Z = check_matrix(logits, "logits", min_cols=2).astype(np.float64)
    y = check_labels(labels, Z.shape[0], rows_name="logits")
    bad = (y < 0) | (y >= Z.shape[1])
    if np.any(bad):
        i = int(np.flatnonzero(bad)[0])
        raise InputError(f"labels must be class indices in [0, {Z.shape[1] - 1}] (logits has {Z.shape[1]} "
                         f"columns), got {y[i]} at index {i}")
    if (norms is None) == (weights is None):
        raise InputError("give exactly one of norms= (per-layer Frobenius norms) or weights= (the weight tensors)")
    if weights is not None:
        prod = frobenius_norm_product(weights)
    else:
        ns = _check_1d(norms, "norms")
        if ns.size == 0:
            raise InputError("norms must hold at least one per-layer norm, got none")
        prod = _exp_product(_log_norm_product(ns.tolist(), "norms"), ns.tolist(), "norms")
    per = _cross_entropy(Z / prod, y)
    return NormalizedLoss(loss=float(per.mean()), unnormalized_loss=float(_cross_entropy(Z, y).mean()),
                          norm_product=prod, per_example=per)


@dataclass(frozen=True)
class LossFit:
    """Least-squares line test = slope * train + intercept across networks (paper 004, figure 2)."""

    slope: float
    intercept: float
    r2: float
    adjusted_r2: float
    rmse: float
    residuals: np.ndarray
    n: int


def normalized_loss_fit(train_losses: Any, test_losses: Any) -> LossFit:
    """Fit test = slope * train + intercept over networks (one point per network); R^2, adjusted R^2, RMSE.

    Needs at least 3 networks and train losses that are not all equal. If all test losses are equal and
    fitted exactly, R^2 is reported as 1 (a perfect fit of a constant).
    """
    x = _check_1d(train_losses, "train_losses")
    yv = _check_1d(test_losses, "test_losses", n=x.shape[0], n_name="train_losses")
    n = x.shape[0]
    if n < 3:
        raise InputError(f"train_losses must hold at least 3 networks for a line with R^2, got {n}")
    xm = x - x.mean()
    sxx = float(xm @ xm)
    if sxx == 0.0:
        raise InputError(f"train_losses are all equal ({float(x[0])!r}): the slope is undefined")
    slope = float(xm @ (yv - yv.mean())) / sxx
    intercept = float(yv.mean() - slope * x.mean())
    resid = yv - (slope * x + intercept)
    ss_res = float(resid @ resid)
    ym = yv - yv.mean()
    ss_tot = float(ym @ ym)
    r2 = 1.0 - ss_res / ss_tot if ss_tot > 0 else 1.0
    adj = 1.0 - (1.0 - r2) * (n - 1) / (n - 2)
    return LossFit(slope=slope, intercept=intercept, r2=r2, adjusted_r2=adj,
                   rmse=math.sqrt(ss_res / n), residuals=resid, n=n)


# ------------------------------------------------------------------------------------------------
# closed form of the one-layer linear model trained on one example (paper 002, eq. 1, appendix B)
# ------------------------------------------------------------------------------------------------
def _one_layer_inputs(W0: Any, x_hat: Any, target: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray, tuple[int, ...]]:
    W = check_matrix(W0, "W0").astype(np.float64)
    xh = _check_vector(x_hat, "x_hat")
    if xh.size != W.shape[1]:
        raise InputError(f"x_hat has {xh.size} elements but W0 has {W.shape[1]} columns")
    t = xh if target is None else _check_vector(target, "target")
    if t.size != W.shape[0]:
        raise InputError(f"target has {t.size} elements but W0 has {W.shape[0]} rows")
    flat = xh.reshape(-1)
    if float(flat @ flat) == 0.0:
        raise InputError("x_hat must have a non-zero norm, got norm 0")
    return W, flat, t.reshape(-1), t.shape


def one_layer_linear_solution(W0: Any, x_hat: Any, target: Any = None) -> np.ndarray:
    """W* = W0 + (y^ - W0 x^) x^T / ||x^||^2: where gradient descent on 0.5 ||W x^ - y^||^2 from W0 converges.

    y^ = ``target`` (default x^, the identity task of paper 002). W0 is (m, d); x_hat has d elements.
    """
    W, xh, t, _ = _one_layer_inputs(W0, x_hat, target)
    return W + np.outer(t - W @ xh, xh) / float(xh @ xh)


def one_layer_linear_prediction(W0: Any, x_hat: Any, x: Any, target: Any = None) -> np.ndarray:
    """Eq. 1: f(x) = (x^T x / ||x^||^2) y^ + W0 (x - (x^T x / ||x^||^2) x^), for rows x (n, ...) of d elements.

    Returns (n, *target.shape) (target defaults to x^, so predictions have x^'s shape).
    """
    W, xh, t, tshape = _one_layer_inputs(W0, x_hat, target)
    X = check_matrix(x, "x", flatten=True).astype(np.float64)
    if X.shape[1] != xh.size:
        raise InputError(f"x has {X.shape[1]} elements per row but x_hat has {xh.size}")
    a = (X @ xh) / float(xh @ xh)
    out = a[:, None] * t[None, :] + (X - a[:, None] * xh[None, :]) @ W.T
    return out.reshape((X.shape[0],) + tshape)


# ------------------------------------------------------------------------------------------------
# activations-file integration (docs/format.md, "Probe keys")
# ------------------------------------------------------------------------------------------------
Row = tuple[str, str, str, object, float]


def _rho_labels(grid: np.ndarray) -> list[str]:
    for digits in range(2, 13):
        labels = [f"rho={v:.{digits}f}" for v in grid]
        if len(set(labels)) == len(labels):
            return labels
    return [f"rho={v!r}" for v in grid]


class _LazyLayers(Mapping):
    """layer -> f.layer(layer), loaded on access (so that layerwise_collapse holds one layer at a time)."""

    def __init__(self, f: Any, layers: Sequence[str]):
        self._f, self._layers = f, list(layers)

    def __getitem__(self, key: str) -> np.ndarray:
        if key not in self._layers:
            raise KeyError(key)
        return self._f.layer(key)

    def __iter__(self):
        return iter(self._layers)

    def __len__(self) -> int:
        return len(self._layers)


def probe_rows(f: Any) -> tuple[list[Row], list[str]]:
    """Long-format rows (layer, subset, metric, class, value) for the probe keys of an activations file.

    * ``probe/pred/<model>`` with ``probe/inputs``, ``probe/rho`` and ``probe/x_hat``: for each model
      (layer column = model name, subset "probe") and each rho (class "rho=0.50"): ``identity_corr``,
      ``identity_corr_std``, ``constant_corr``, ``constant_corr_std``, ``n_undefined`` when some
      predictions have zero norm; class None rows give ``identity_corr`` / ``constant_corr`` averaged
      over the rho grid (each rho weighted equally; paper 002 figure 13).
    * ``probe/layer/<layer>`` (outputs of one layer on the probe inputs): the same correlations when the
      layer output has as many elements as the input, else a note.
    * ``act/<layer>`` with ``labels`` and a ``split`` holding train and test rows: ``collapse_error`` per
      layer (subset "test", class None, the averaging classifier of paper 002 section 3.4) and, when the
      file has ``probe/collapse_inputs`` (the raw inputs of the same n rows), ``collapse_error_baseline``
      with layer "input". ``collapse_chance`` (1 - 1/n_classes) is reported once with layer "input".
    Returns (rows, notes).
    """
    src = getattr(f, "path", "activations file")
    keys = list(f.keys())
    rows: list[Row] = []
    notes: list[str] = []
    preds = [k for k in keys if k.startswith("probe/pred/")]
    layer_outs = [k for k in keys if k.startswith("probe/layer/")]
    known = {"probe/x_hat", "probe/inputs", "probe/rho", "probe/collapse_inputs"}
    for k in keys:
        if k.startswith("probe/") and k not in known and k not in preds and k not in layer_outs:
            notes.append(f"{src}: probe key '{k}' is not a known probe key; ignored")

    if preds or layer_outs:
        need = [k for k in ("probe/x_hat", "probe/inputs", "probe/rho") if k not in keys]
        if need:
            raise InputError(f"{src}: probe predictions need the keys {', '.join(need)} (missing)")
        x_hat = f.array("probe/x_hat")
        inputs = f.array("probe/inputs")
        rho = f.array("probe/rho")
        if inputs.ndim < 2:
            raise InputError(f"{src}: 'probe/inputs' must be (n_probe, ...), got shape {describe_shape(inputs.shape)}")
        n_probe = inputs.shape[0]
        if np.asarray(rho).shape != (n_probe,):
            raise InputError(f"{src}: 'probe/rho' has shape {describe_shape(np.asarray(rho).shape)} but 'probe/inputs' "
                             f"has {n_probe} rows")
        for key in preds + layer_outs:
            pred = f.array(key)
            if pred.ndim < 1 or pred.shape[0] != n_probe:
                raise InputError(f"{src}: '{key}' has shape {describe_shape(pred.shape)} but 'probe/inputs' has "
                                 f"{n_probe} rows")
            name = key[len("probe/pred/"):] if key in preds else key[len("probe/layer/"):]
            if key in layer_outs and int(np.prod(pred.shape[1:])) != int(np.prod(inputs.shape[1:])):
                notes.append(f"{src}: '{key}' has {int(np.prod(pred.shape[1:]))} elements per probe but the inputs "
                             f"have {int(np.prod(inputs.shape[1:]))}: no identity/constant correlation")
                continue
            try:
                res = probe_correlations(inputs, pred, x_hat, rho)
            except InputError as exc:
                raise InputError(f"{src}: '{key}': {exc}") from None
            notes.extend(f"{src}: '{key}': {note}" for note in res.notes)
            for label, j in zip(_rho_labels(res.rho), range(res.rho.size)):
                rows.append((name, "probe", "identity_corr", label, float(res.identity_mean[j])))
                rows.append((name, "probe", "identity_corr_std", label, float(res.identity_std[j])))
                rows.append((name, "probe", "constant_corr", label, float(res.constant_mean[j])))
                rows.append((name, "probe", "constant_corr_std", label, float(res.constant_std[j])))
                if res.n_undefined[j]:
                    rows.append((name, "probe", "n_undefined", label, float(res.n_undefined[j])))
            if np.all(np.isfinite(res.identity_mean)):
                rows.append((name, "probe", "identity_corr", None, float(res.identity_mean.mean())))
                rows.append((name, "probe", "constant_corr", None, float(res.constant_mean.mean())))
            else:
                notes.append(f"{src}: '{key}': some rho have only undefined correlations; no average over rho")
    elif "probe/inputs" in keys or "probe/x_hat" in keys:
        notes.append(f"{src}: probe inputs but no 'probe/pred/<model>' keys: no identity/constant correlations")

    layers = list(getattr(f, "layers", []) or [])
    split = getattr(f, "split", None)
    labels = getattr(f, "labels", None)
    base_key = "probe/collapse_inputs"
    if layers and split is not None and labels is not None:
        s = np.asarray(split).astype(str)
        if not (np.any(s == "train") and np.any(s == "test")):
            notes.append(f"{src}: split has no {'train' if not np.any(s == 'train') else 'test'} rows: "
                         "no layer-wise collapse")
        else:
            reps = _LazyLayers(f, layers)  # one layer in memory at a time
            base = f.array(base_key) if base_key in keys else None
            try:
                col = layerwise_collapse(reps, labels, s, inputs=base)
            except InputError as exc:
                raise InputError(f"{src}: layer-wise collapse: {exc}") from None
            for layer, err in zip(col.layers, col.error):
                rows.append((layer, "test", "collapse_error", None, float(err)))
            if col.baseline_error is not None:
                rows.append(("input", "test", "collapse_error_baseline", None, float(col.baseline_error)))
            rows.append(("input", "test", "collapse_chance", None, float(col.chance_error)))
            notes.extend(f"{src}: collapse: {note}" for note in col.notes)
            if base is None:
                notes.append(f"{src}: no '{base_key}': no raw-input baseline for the collapse error")
    elif layers and split is None and (preds or base_key in keys):
        notes.append(f"{src}: no 'split' (train/test): no layer-wise collapse")
    return rows, notes
