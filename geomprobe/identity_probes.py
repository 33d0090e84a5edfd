"""Identity-crisis probes (paper 002): probe inputs at a given correlation rho with the training
example, and the correlation of a model's predictions with the identity target (the input) and the
constant target (the training example x^); the rows they give in ``geomprobe analyze``.

One home per measure: formula here (docs/metrics.md, "Identity-crisis probes"), kernel
``geomprobe/_kernels/probes.py::rowwise_correlation``, numpy twin and tests in
``tests/test_identity_probes.py``.

"Correlation" between two vectors means, throughout, the cosine similarity of the flattened vectors
<a, b> / (||a|| ||b||). Paper 002 does not define its "correlation" further, but its probe inputs are
built by rotating a random vector "to a given correlation rho" with the training image, rho = 0 being
"orthogonal" to it and rho = 1 being the image itself: that is the cosine (uncentred) correlation. The
functions that measure correlations also accept ``kind="pearson"`` (each vector centred by its own mean
over its elements first) for users who want the mean-centred version.
"""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from ._kernels import probes as _k
from ._probe_checks import KINDS, check_rho, check_vector
from ._validation import (
    AnalysisError,
    InputError,
    check_choice,
    check_matrix,
    check_positive_int,
    check_seed,
    describe_shape,
)
from .registry import MetricInfo, register

__all__ = [
    "ProbeInputs",
    "ProbeCorrelations",
    "ProbeHeatmap",
    "make_probe_inputs",
    "probe_correlations",
    "probe_heatmap",
    "correlation_rows",
    "METRICS",
]

# The rows correlation_rows emits (layer column = model name, subset "probe", class "rho=...").
METRICS = register({
    "identity_corr": MetricInfo("correlation of the prediction with its input (per rho with rho=...)",
                                better="neither"),
    "identity_corr_std": MetricInfo("spread of identity_corr within a rho"),
    "constant_corr": MetricInfo("correlation of the prediction with the training example (per rho)"),
    "constant_corr_std": MetricInfo("spread of constant_corr within a rho"),
    "n_undefined": MetricInfo("probes whose prediction had zero norm (correlation undefined)"),
})

Row = tuple[str, str, str, object, float]
PROBE_KEYS = ("probe/x_hat", "probe/inputs", "probe/rho", "probe/collapse_inputs")


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
    x = check_vector(x_hat, "x_hat", min_size=2)
    r = check_rho(rho)
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
    check_choice(kind, "kind", KINDS)
    X = check_matrix(inputs, "inputs", flatten=True)
    P = check_matrix(predictions, "predictions", flatten=True)
    xh = check_vector(x_hat, "x_hat").reshape(-1)
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
    r = check_rho(rho, "rho", n=n, n_name="inputs (rows)")
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
# activations-file rows (docs/format.md, "Probe keys")
# ------------------------------------------------------------------------------------------------
def _rho_labels(grid: np.ndarray) -> list[str]:
    for digits in range(2, 13):
        labels = [f"rho={v:.{digits}f}" for v in grid]
        if len(set(labels)) == len(labels):
            return labels
    return [f"rho={v!r}" for v in grid]


def correlation_rows(f: Any) -> tuple[list[Row], list[str]]:
    """Rows (layer, subset, metric, class, value) for the probe-prediction keys of an activations file.

    ``probe/pred/<model>`` with ``probe/inputs``, ``probe/rho`` and ``probe/x_hat``: for each model
    (layer column = model name, subset "probe") and each rho (class "rho=0.50"): ``identity_corr``,
    ``identity_corr_std``, ``constant_corr``, ``constant_corr_std``, ``n_undefined`` when some
    predictions have zero norm; class None rows give ``identity_corr`` / ``constant_corr`` averaged
    over the rho grid (each rho weighted equally; paper 002 figure 13). ``probe/layer/<layer>``
    (outputs of one layer on the probe inputs): the same correlations when the layer output has as
    many elements as the input, else a note. Unknown ``probe/...`` keys get a note. Returns (rows, notes).
    """
    src = getattr(f, "path", "activations file")
    keys = list(f.keys())
    rows: list[Row] = []
    notes: list[str] = []
    preds = [k for k in keys if k.startswith("probe/pred/")]
    layer_outs = [k for k in keys if k.startswith("probe/layer/")]
    known = set(PROBE_KEYS)
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

    return rows, notes
