"""Array checks shared by the probe, collapse and weight modules (paper 002 / 004 measures).

Private: user-facing messages name the input, the rule and the value (like ``_validation.py``).
"""
from __future__ import annotations

from typing import Any

import numpy as np

from ._validation import InputError, check_finite, describe_shape

__all__ = ["check_vector", "check_1d", "check_rho", "KINDS"]

KINDS = ("cosine", "pearson")


def check_vector(x: Any, name: str, *, min_size: int = 1) -> np.ndarray:
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


def check_1d(x: Any, name: str, *, n: int | None = None, n_name: str = "") -> np.ndarray:
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


def check_rho(rho: Any, name: str = "rho", *, n: int | None = None, n_name: str = "") -> np.ndarray:
    r = check_1d(rho, name, n=n, n_name=n_name)
    if r.size == 0:
        raise InputError(f"{name} must hold at least one value in [0, 1], got an empty array")
    bad = (r < 0.0) | (r > 1.0)
    if np.any(bad):
        i = int(np.flatnonzero(bad)[0])
        raise InputError(f"{name} must lie in [0, 1], got {float(r[i])!r} at index {i}")
    return r

