"""Input handling shared by the MFTMA functions: (X, labels) or a list of per-class arrays."""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

import numpy as np

from .._validation import InputError, check_labels, check_matrix, encode_labels
from ..local_runner import available_cores


@dataclass(frozen=True)
class Manifolds:
    """P class manifolds without copying X: ``get(i)`` returns class i's (m_i, N) points.

    classes: class ids (sorted label values, or 0..P-1 for list input); sizes: m_i; N: features.
    """
    classes: np.ndarray
    sizes: np.ndarray
    N: int
    dtype: np.dtype
    _X: object            # the 2-D array, or the list of per-class arrays
    _index: tuple | None  # per-class row indices into X (None for list input)

    @property
    def P(self) -> int:
        return len(self.sizes)

    def get(self, i: int) -> np.ndarray:
        if self._index is None:
            return self._X[i]
        idx = self._index[i]
        return self._X[idx[0]:idx[-1] + 1] if _contiguous(idx) else self._X[idx]


def _contiguous(idx: np.ndarray) -> bool:
    return idx.size > 0 and idx[-1] - idx[0] + 1 == idx.size


def as_manifolds(X, labels, *, min_classes: int = 2) -> Manifolds:
    """Validate once and describe the class manifolds (float32 stays float32; no copy of X)."""
    if isinstance(X, (list, tuple)):
        if labels is not None:
            raise InputError("labels must be None when X is a list of per-class arrays")
        if len(X) < min_classes:
            raise InputError(f"X must hold at least {min_classes} classes, got {len(X)}")
        arrs = [check_matrix(x, f"X[{i}]") for i, x in enumerate(X)]
        N = arrs[0].shape[1]
        for i, a in enumerate(arrs):
            if a.shape[1] != N:
                raise InputError(f"X[{i}] has {a.shape[1]} features but X[0] has {N}")
        dtype = np.result_type(*[a.dtype for a in arrs])
        return Manifolds(np.arange(len(arrs)), np.array([a.shape[0] for a in arrs]), N, dtype, arrs, None)
    if labels is None:
        raise InputError("labels is required when X is a 2-D array (or pass a list of per-class arrays)")
    X = check_matrix(X, "X")
    labels = check_labels(labels, X.shape[0])
    classes, codes = encode_labels(labels)
    if len(classes) < min_classes:
        raise InputError(
            f"labels must contain at least {min_classes} classes, got {len(classes)} "
            f"({', '.join(map(str, classes[:5]))})"
        )
    order = np.argsort(codes, kind="stable")
    bounds = np.searchsorted(codes[order], np.arange(len(classes) + 1))
    index = tuple(order[bounds[i]:bounds[i + 1]] for i in range(len(classes)))
    return Manifolds(classes, np.diff(bounds), X.shape[1], X.dtype, X, index)


def n_workers(n_tasks: int) -> int:
    """Threads for a pool of n_tasks independent tasks: the CPUs this process may use (affinity),
    capped by numba's thread setting (NUMBA_NUM_THREADS: 1 in Dask workers) and by n_tasks."""
    cpus = available_cores()
    try:
        import numba
        cpus = min(cpus, int(numba.config.NUMBA_NUM_THREADS))
    except Exception:  # pragma: no cover
        pass
    return max(1, min(cpus, n_tasks))


def blas_threads(n: int):
    """Context limiting BLAS (OpenBLAS/MKL, numpy's and scipy's) to n threads while a thread pool
    runs tasks that call it, so that pool threads x BLAS threads never oversubscribe the cores
    (threadpoolctl; a no-op if it is not installed). Results do not depend on it."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # pragma: no cover
        return contextlib.nullcontext()
    return threadpool_limits(limits=n, user_api="blas")
