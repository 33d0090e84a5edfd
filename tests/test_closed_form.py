"""Tests of geomprobe.closed_form: eq. 1 of paper 002 (one-layer linear model trained on one example)
against gradient descent."""
from __future__ import annotations

import numpy as np
import pytest

from geomprobe import InputError
from geomprobe import closed_form as gp


@pytest.fixture
def rng():
    return np.random.default_rng(20240607)


# ------------------------------------------------------------------------------------------------
# eq. 1: one-layer linear network trained on one example
# ------------------------------------------------------------------------------------------------
def gradient_descent_one_example(W0, x_hat, target, lr, steps):
    """Plain GD on 0.5 ||W x^ - y^||^2: gradient (W x^ - y^) x^T (paper 002, appendix B, eq. 3)."""
    W = W0.copy()
    for _ in range(steps):
        W -= lr * np.outer(W @ x_hat - target, x_hat)
    return W


@pytest.mark.parametrize("d, m", [(6, 6), (12, 12), (5, 3)])
def test_eq1_matches_gradient_descent(rng, d, m):
    W0 = rng.standard_normal((m, d)) / np.sqrt(d)
    x_hat = rng.standard_normal(d)
    target = x_hat if m == d else rng.standard_normal(m)
    lr = 0.5 / float(x_hat @ x_hat)  # contraction factor 1 - lr ||x^||^2 = 0.5 per step
    W_gd = gradient_descent_one_example(W0, x_hat, target, lr, 200)
    W_cf = gp.one_layer_linear_solution(W0, x_hat, None if m == d else target)
    np.testing.assert_allclose(W_gd, W_cf, rtol=0, atol=1e-12)
    X = rng.standard_normal((7, d))
    pred = gp.one_layer_linear_prediction(W0, x_hat, X, None if m == d else target)
    np.testing.assert_allclose(pred, X @ W_gd.T, rtol=0, atol=1e-12)
    # the parts of eq. 1: x^ maps to the target, directions orthogonal to x^ keep W0's map
    np.testing.assert_allclose(W_cf @ x_hat, target, atol=1e-12)
    u = X[0] - (X[0] @ x_hat) / (x_hat @ x_hat) * x_hat
    np.testing.assert_allclose(W_cf @ u, W0 @ u, atol=1e-12)


def test_eq1_shapes_and_errors(rng):
    x_hat = rng.random((3, 4))
    W0 = rng.standard_normal((12, 12))
    X = rng.random((5, 3, 4))
    pred = gp.one_layer_linear_prediction(W0, x_hat, X)
    assert pred.shape == (5, 3, 4)
    np.testing.assert_allclose(gp.one_layer_linear_prediction(W0, x_hat, x_hat[None])[0], x_hat, atol=1e-12)
    with pytest.raises(InputError, match=r"x_hat has 12 elements but W0 has 10 columns"):
        gp.one_layer_linear_solution(np.ones((12, 10)), x_hat)
    with pytest.raises(InputError, match=r"target has 12 elements but W0 has 3 rows"):
        gp.one_layer_linear_solution(np.ones((3, 12)), x_hat)
    with pytest.raises(InputError, match=r"x_hat must have a non-zero norm, got norm 0"):
        gp.one_layer_linear_solution(W0, np.zeros(12))
    with pytest.raises(InputError, match=r"x has 6 elements per row but x_hat has 12"):
        gp.one_layer_linear_prediction(W0, x_hat, np.ones((2, 6)))
    with pytest.raises(InputError, match=r"W0 must be 2-D \(n_samples, n_features\), got shape \(12,\)"):
        gp.one_layer_linear_solution(np.ones(12), x_hat)
