"""Every user-facing check and message of geomprobe.

Messages name the input, the rule and the actual value, e.g.
``"labels has 499 entries but X has 500 rows"``. Public functions call these helpers once, convert
once, and then hand plain arrays to the kernels (which never raise).
"""
from __future__ import annotations

import numbers
from typing import Any

import numpy as np

__all__ = [
    "GeomprobeError",
    "InputError",
    "AnalysisError",
    "check_matrix",
    "check_labels",
    "check_finite",
    "check_seed",
    "check_positive_int",
    "check_nonneg_float",
    "check_choice",
    "encode_labels",
    "describe_shape",
]


class GeomprobeError(Exception):
    """Base class of every error geomprobe raises on purpose."""


class InputError(GeomprobeError, ValueError):
    """The input breaks a documented rule (bad file, bad shape, bad label, bad option).

    The command line maps it to exit code 2 (usage error) and prints only the message.
    """


class AnalysisError(GeomprobeError, RuntimeError):
    """A computation could not be completed on valid input (e.g. a solver reported failure).

    The command line maps it to exit code 1.
    """


_FLOAT_INT_LIMIT = 2.0**53


def describe_shape(shape: tuple[int, ...]) -> str:
    return "(" + ", ".join(str(s) for s in shape) + (",)" if len(shape) == 1 else ")")


def check_matrix(
    X: Any,
    name: str = "X",
    *,
    min_rows: int = 1,
    min_cols: int = 1,
    flatten: bool = False,
    allow_float16: bool = True,
    finite: bool = True,
) -> np.ndarray:
    """Return X as a C-contiguous 2-D float32 or float64 array.

    float16 input is promoted to float32 (numba has no float16 arithmetic); float32 stays float32
    (kernels accumulate in float64); integer and bool input is converted to float64.
    ``flatten=True`` reshapes (n, ...) to (n, prod(...)).
    """
    arr = np.asarray(X)
    if arr.dtype.hasobject:
        raise InputError(f"{name} must be a numeric array, got dtype {arr.dtype}")
    if not (np.issubdtype(arr.dtype, np.number) or arr.dtype == np.bool_):
        raise InputError(f"{name} must be a numeric array, got dtype {arr.dtype}")
    if np.iscomplexobj(arr):
        raise InputError(f"{name} must be real, got dtype {arr.dtype}")
    if arr.ndim < 2 or (arr.ndim > 2 and not flatten):
        need = "at least 2-D (n_samples, features...)" if flatten else "2-D (n_samples, n_features)"
        raise InputError(f"{name} must be {need}, got shape {describe_shape(arr.shape)}")
    if arr.ndim > 2:
        arr = arr.reshape(arr.shape[0], -1)
    if arr.shape[0] < min_rows:
        raise InputError(f"{name} must have at least {min_rows} row(s), got shape {describe_shape(arr.shape)}")
    if arr.shape[1] < min_cols:
        raise InputError(
            f"{name} must have at least {min_cols} feature(s), got shape {describe_shape(arr.shape)}"
        )
    if arr.dtype == np.float16:
        if not allow_float16:
            raise InputError(f"{name} must be float32 or float64, got float16")
        arr = arr.astype(np.float32)
    elif arr.dtype not in (np.float32, np.float64):
        arr = arr.astype(np.float64)
    arr = np.ascontiguousarray(arr)
    if finite:
        check_finite(arr, name)
    return arr


def nonfinite_in_block(block: np.ndarray) -> tuple[int, tuple[int, int] | None]:
    """(count of NaN/Inf in a 2-D block, (row, column) of the first one or None).

    A float block is first decided by one sum (a NaN or Inf makes it non-finite: one pass, no boolean
    copy); an overflow of finite values only sends the block to the exact element-wise scan."""
    if block.size == 0:
        return 0, None
    if block.dtype.kind == "f":
        with np.errstate(over="ignore", invalid="ignore"):
            if np.isfinite(np.add.reduce(block, axis=None)):
                return 0, None
    bad = ~np.isfinite(block)
    c = int(bad.sum())
    if not c:
        return 0, None
    r, col = np.argwhere(bad)[0]
    return c, (int(r), int(col))


def check_finite(arr: np.ndarray, name: str, *, chunk_rows: int = 65536) -> None:
    """Raise if arr holds NaN or Inf: the message gives the count and the first position.

    Scans in row chunks so that no full boolean copy of a large array is made.
    """
    if arr.dtype.kind not in "fc":
        return
    n = arr.shape[0] if arr.ndim else 1
    flat = arr.reshape(n, -1) if arr.ndim else arr.reshape(1, 1)
    count = 0
    first = None
    for start in range(0, n, chunk_rows):
        block = flat[start:start + chunk_rows]
        c, at = nonfinite_in_block(block)
        if c:
            count += c
            if first is None:
                first = (start + at[0], at[1])
    if count:
        kinds = "NaN or Inf"
        raise InputError(
            f"{name} contains {count} non-finite value(s) ({kinds}); first at row {first[0]}, "
            f"column {first[1]}"
        )


def check_labels(labels: Any, n: int | None = None, name: str = "labels", *, rows_name: str = "X") -> np.ndarray:
    """Return labels as a 1-D int64 array; integral floats are accepted, anything else is refused."""
    arr = np.asarray(labels)
    if arr.dtype.hasobject:
        raise InputError(f"{name} must be integers, got dtype object")
    if arr.ndim != 1:
        raise InputError(f"{name} must be 1-D (n_samples,), got shape {describe_shape(arr.shape)}")
    if n is not None and arr.shape[0] != n:
        raise InputError(f"{name} has {arr.shape[0]} entries but {rows_name} has {n} rows")
    if arr.dtype == np.bool_:
        return arr.astype(np.int64)
    if np.issubdtype(arr.dtype, np.unsignedinteger) and arr.size and int(arr.max()) > np.iinfo(np.int64).max:
        i = int(np.argmax(arr))
        raise InputError(f"{name} must fit in int64, got {int(arr[i])} at index {i}")
    if np.issubdtype(arr.dtype, np.integer):
        return arr.astype(np.int64, copy=False)
    if np.issubdtype(arr.dtype, np.floating):
        if arr.size and not np.all(np.isfinite(arr)):
            i = int(np.flatnonzero(~np.isfinite(arr))[0])
            raise InputError(f"{name} must be integers, got non-finite value {float(arr[i])} at index {i}")
        frac = arr != np.round(arr)
        if np.any(frac):
            i = int(np.flatnonzero(frac)[0])
            raise InputError(f"{name} must be integers, got {float(arr[i])!r} at index {i} (dtype {arr.dtype})")
        # beyond 2**53 a float cannot tell neighbouring integers apart (and beyond 2**63 int64 overflows):
        # distinct labels would collapse into one class
        big = np.abs(arr) > _FLOAT_INT_LIMIT
        if np.any(big):
            i = int(np.flatnonzero(big)[0])
            raise InputError(
                f"{name} given as floats must lie within +-2**53 (= {_FLOAT_INT_LIMIT:.0f}) to stay distinct "
                f"integers, got {float(arr[i])!r} at index {i}; pass integer labels (or encode them with "
                "numpy.unique(labels, return_inverse=True))"
            )
        return arr.astype(np.int64)
    raise InputError(f"{name} must be integers, got dtype {arr.dtype}")


def encode_labels(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Map labels to codes 0..K-1 in sorted class order. Returns (classes, codes)."""
    classes, codes = np.unique(labels, return_inverse=True)
    return classes, codes.astype(np.int64).reshape(-1)


def check_seed(seed: Any, name: str = "seed") -> np.random.Generator:
    """Turn None / int / SeedSequence / Generator into a Generator. Never touches global state."""
    if isinstance(seed, np.random.Generator):
        return seed
    if seed is None or isinstance(seed, np.random.SeedSequence):
        return np.random.default_rng(seed)
    if isinstance(seed, (bool, np.bool_)):
        raise InputError(f"{name} must be an integer >= 0 or a numpy Generator, got {seed!r}")
    if isinstance(seed, numbers.Integral):
        if int(seed) < 0:
            raise InputError(f"{name} must be >= 0, got {seed}")
        return np.random.default_rng(int(seed))
    raise InputError(f"{name} must be an integer >= 0 or a numpy Generator, got {seed!r}")


def check_positive_int(value: Any, name: str, *, minimum: int = 1) -> int:
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Integral):
        raise InputError(f"{name} must be an integer >= {minimum}, got {value!r}")
    if int(value) < minimum:
        raise InputError(f"{name} must be an integer >= {minimum}, got {value}")
    return int(value)


def check_nonneg_float(value: Any, name: str) -> float:
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise InputError(f"{name} must be a number >= 0, got {value!r}") from None
    if not np.isfinite(v) or v < 0:
        raise InputError(f"{name} must be a finite number >= 0, got {value!r}")
    return v


def check_choice(value: Any, name: str, choices: tuple[str, ...]) -> str:
    if value not in choices:
        raise InputError(f"{name} must be one of {', '.join(map(repr, choices))}; got {value!r}")
    return value
