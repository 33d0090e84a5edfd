"""Weights and loss of trained networks: relative weight distance from initialisation (paper 002,
appendix D), the product of Frobenius norms, the normalised cross-entropy (paper 004) and its
train-vs-test line fit.

One home per measure: the torch trainers (``geomprobe.trainers.checkpoint.relative_weight_distance``,
``geomprobe.trainers.gradstats.normalized_loss``) compute tensors and call the formulas here. Tests:
``tests/test_weights.py``.

Zero-norm rule (one rule, everywhere): the relative distance ||W_t - W_0||_F / ||W_0||_F of a tensor
whose initial norm is 0 (e.g. a zero-initialised bias) is undefined; :func:`relative_distance` returns
None for it and :func:`weight_distance` refuses it or lists it in ``skipped`` (``zero_init``).
"""
from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ._probe_checks import check_1d, check_vector
from ._validation import InputError, check_choice, check_finite, check_labels, check_matrix, describe_shape

__all__ = [
    "WeightDistance",
    "NormalizedLoss",
    "LossFit",
    "relative_distance",
    "weight_distance",
    "frobenius_norm_product",
    "log_norm_product",
    "normalized_loss",
    "normalized_loss_fit",
]


def relative_distance(diff_norm: float, init_norm: float) -> float | None:
    """||W_t - W_0||_F / ||W_0||_F from the two norms; None where ||W_0||_F is 0 (undefined).

    The one home of the weight-distance formula and its zero-norm rule; callers that hold tensors
    elsewhere (torch, GPU) compute the two norms there and call this.
    """
    return float(diff_norm) / float(init_norm) if init_norm > 0 else None


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
        rel = relative_distance(float(np.linalg.norm(b64 - a64)), n0)
        if rel is None:
            if zero_init == "raise":
                raise InputError(
                    f"tensor {k!r} has zero norm at init (shape {describe_shape(a.shape)}): the relative distance "
                    "is undefined; pass zero_init='skip' to leave such tensors out"
                )
            skipped.append((k, "zero norm at init"))
            continue
        names.append(k)
        norms.append(n0)
        dist.append(rel)
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


def log_norm_product(norms: Mapping[str, float] | Sequence[float], name: str = "norms") -> float:
    """log prod_k ||W_k||_F = sum_k log ||W_k||_F of per-layer Frobenius norms (a mapping layer -> norm
    or a sequence). A norm that is 0, negative or not finite is an InputError naming the layer: the
    normalised loss is undefined for a network with an all-zero layer."""
    items = list(norms.items()) if isinstance(norms, Mapping) else list(enumerate(norms))
    if not items:
        raise InputError(f"{name} must hold at least one per-layer norm, got none")
    total = 0.0
    for key, v in items:
        v = float(v)
        if not np.isfinite(v) or v <= 0:
            where = f"{name}[{key!r}]" if isinstance(norms, Mapping) else f"{name}[{key}]"
            raise InputError(f"{where} must be a finite number > 0 (the normalised loss divides by the "
                             f"product of the norms), got {v!r}")
        total += math.log(v)
    return total


def frobenius_norm_product(weights: Sequence[Any]) -> float:
    """prod_k ||W_k||_F over the given weight tensors (each flattened); computed through logs."""
    ws = list(weights.values()) if isinstance(weights, Mapping) else list(weights)
    if not ws:
        raise InputError("weights must hold at least one tensor, got none")
    norms = []
    for i, w in enumerate(ws):
        arr = check_vector(w, f"weights[{i}]")
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
        ns = check_1d(norms, "norms")
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
    x = check_1d(train_losses, "train_losses")
    yv = check_1d(test_losses, "test_losses", n=x.shape[0], n_name="train_losses")
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
