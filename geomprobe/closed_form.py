"""Closed form of the one-layer linear model trained on one example (paper 002, eq. 1, appendix B).

Tests: ``tests/test_closed_form.py`` (compared with gradient descent).
"""
from __future__ import annotations

from typing import Any

import numpy as np

from ._probe_checks import check_vector
from ._validation import InputError, check_matrix

__all__ = ["one_layer_linear_solution", "one_layer_linear_prediction"]


# ------------------------------------------------------------------------------------------------
# closed form of the one-layer linear model trained on one example (paper 002, eq. 1, appendix B)
# ------------------------------------------------------------------------------------------------
def _one_layer_inputs(W0: Any, x_hat: Any, target: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray, tuple[int, ...]]:
    W = check_matrix(W0, "W0").astype(np.float64)
    xh = check_vector(x_hat, "x_hat")
    if xh.size != W.shape[1]:
        raise InputError(f"x_hat has {xh.size} elements but W0 has {W.shape[1]} columns")
    t = xh if target is None else check_vector(target, "target")
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
